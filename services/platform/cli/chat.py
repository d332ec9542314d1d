"""`tandem chat`: an interactive, streaming chat with a model, in this process.

Each line typed is a user turn; the reply streams as it is generated, through the engine's
incremental detokenizer (so a multi-byte character is never printed in halves). The conversation
is kept, so later turns see earlier ones. Commands: /reset forgets the conversation, /exit (or
end of input, Ctrl-D) leaves. Ctrl-C during a reply stops that reply and keeps the session.
"""

from __future__ import annotations

import argparse
import sys

from services.platform.cli.generate import add_engine_args, add_sampling_args, load_engine, sampling_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model interactively (streaming), in-process")
    add_engine_args(p)
    p.add_argument("--system", help="system message for the conversation")
    add_sampling_args(p, max_tokens=512, temperature=0.7)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    engine = load_engine(args)
    tok = engine.tokenizer
    params = sampling_params(args, tok.vocab_size)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} — /reset to start over, /exit or Ctrl-D to leave", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": text})
        prompt_ids = tok.encode_chat([*system, *history])
        turn += 1
        request_id = f"chat-{turn}"
        engine.add_request(request_id, prompt_ids, params)
        reply = ""
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    print(out.new_text, end="", flush=True)
                    reply = out.text
        except KeyboardInterrupt:
            engine.abort(request_id)
            print(file=sys.stderr)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0
