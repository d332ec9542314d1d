"""`tandem generate`: one prompt through the engine, in this process (no services needed).

stdout carries only the generated text (or, with --json, one JSON object with text and token ids);
logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from shared import envs
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.store import DEFAULT_MODEL, ModelStore
from shared.tokenizer import Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt with the engine, in-process")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name in the store (default: {DEFAULT_MODEL})"
    )
    p.add_argument("--store", type=Path, default=None, help="store directory (default: $TANDEM_HOME/models)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print a JSON object with the text and token ids")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    torch.set_num_threads(envs.torch_threads(min(2, os.cpu_count() or 1)))
    store = ModelStore(args.store or envs.models_dir())
    info = store.get(args.model)
    path = store.path(info.name)
    tok = Tokenizer.from_dir(path)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt_ids = tok.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    params.validate(tok.vocab_size)
    engine = LLMEngine.from_store(
        path, EngineConfig(device=args.device, dtype=args.dtype), model_id=info.name
    )
    out = engine.generate([prompt_ids], params)[0]
    ids = [t for t in out.output_token_ids if not (out.finish_reason == "stop" and t in tok.stop_token_ids)]
    text = tok.decode(ids, skip_special_tokens=True)
    if args.json:
        print(
            json.dumps(
                {
                    "text": text,
                    "token_ids": out.output_token_ids,
                    "prompt_tokens": len(prompt_ids),
                    "finish_reason": out.finish_reason,
                },
                ensure_ascii=False,
            )
        )
    else:
        print(text)
    return 0
