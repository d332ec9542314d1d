"""Speculative decoding benchmark: one engine, each request's `speculative` choice, same process.

    .venv/bin/python -m tests.bench.speculative [--quick]

Workloads (SmolLM2-135M-Instruct, fp32, greedy unless said):
  summarize  4 chat requests asking to summarize a passage of the docs (~300 tokens) — the output
             quotes its input, prompt lookup's case — one at a time, and the 4 at once
  chat       4 short chat questions, one at a time; and sampled at temperature 0.7
Methods: off (the baseline), ngram (prompt lookup, up to 4 drafts, n 3..4), draft (4 drafts from the same
model's int4 weights, the built-in GGUF's Q4_1 integers: no smaller model with SmolLM2's tokenizer is
on this machine, so the draft reads ~0.4x the bytes of the target rather than being a smaller model).
Every prompt is put in the prefix cache first, so the figures are decode speed (no method pays a cold
prefill). Reports output tok/s per (workload, method), the ratio to off, the acceptance rate (accepted /
drafted) and whether greedy outputs equal the baseline's. --quick: 64 new tokens, one repetition.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.speculative import METHODS
from shared.store import ModelStore
from shared.store.builtin import BUILTIN
from tests.bench.common import best_time, emit, environment, log, model_path, parser

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity simply.",
             "List three fruits."]  # fmt: skip


def passages(n: int, words: int = 220) -> list[str]:
    docs = Path(__file__).resolve().parents[2] / "docs"
    text = " ".join((docs / "architecture.md").read_text().split())
    step = len(text.split()) // (n + 1)
    return [" ".join(text.split()[i * step : i * step + words]) for i in range(n)]


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    new_tokens = 64 if args.quick else 128
    target = model_path(args)
    gguf = BUILTIN[args.model].locate() if args.model in BUILTIN else None
    if gguf is None:
        raise SystemExit(f"{args.model} is not a built-in GGUF model")
    store = ModelStore(Path(tempfile.mkdtemp(prefix="tandem-spec-")))
    log("importing the GGUF's Q4_1 integers as the draft model ...")
    store.import_gguf(gguf, "draft", keep_quantized=True)
    engine = LLMEngine.from_store(target, EngineConfig(draft_model=str(store.path("draft"))))
    tok = engine.tokenizer
    summarize = [tok.encode_chat([{"role": "user", "content": "Summarize this text, quoting its key "
                                   f"sentences:\n\n{p}"}]) for p in passages(4)]  # fmt: skip
    chats = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    workloads = {  # name -> (prompts, at once?, temperature)
        "summarize_b1": (summarize, False, 0.0),
        "summarize_b4": (summarize, True, 0.0),
        "chat_b1": (chats, False, 0.0),
        "chat_sampled_b1": (chats, False, 0.7),
    }
    results = {"model": args.model, "new_tokens": new_tokens, "draft": "int4 (GGUF Q4_1) of the same model",
               "prompt_tokens_summarize": sum(map(len, summarize)) // 4, **environment(args)}  # fmt: skip
    # warm up, and put every prompt in the prefix cache, so that no method pays a cold prefill
    engine.generate(summarize + chats, SamplingParams(max_tokens=8, temperature=0))
    for name, (prompts, together, temperature) in workloads.items():
        baseline = None
        for method in METHODS:
            params = SamplingParams(
                max_tokens=new_tokens, temperature=temperature, seed=0, speculative=method
            )
            outputs: list[list[int]] = []

            def run(params=params, prompts=prompts, together=together, outputs=outputs):
                outputs.clear()
                groups = [prompts] if together else [[p] for p in prompts]
                for group in groups:
                    outputs.extend(o.output_token_ids for o in engine.generate(group, params))

            before = dict(vars(engine.speculator.stats[method])) if method != "off" else None
            log(f"{name}: {method}")
            seconds = best_time(run, repeats)
            tokens = sum(map(len, outputs))
            key = f"{name}_{method}"
            results[f"{key}_tok_s"] = round(tokens / seconds, 2)
            if method == "off":
                baseline = list(outputs)
                continue
            after = engine.speculator.stats[method]
            drafted = after.draft_tokens - before["draft_tokens"]
            results[f"{key}_ratio"] = round(results[f"{key}_tok_s"] / results[f"{name}_off_tok_s"], 3)
            results[f"{key}_acceptance"] = round((after.accepted_tokens - before["accepted_tokens"])
                                                 / max(drafted, 1), 3)  # fmt: skip
            if temperature == 0:
                results[f"{key}_identical"] = outputs == baseline
    emit(results)
    return results


if __name__ == "__main__":
    main()
