"""Quantization benchmark: the same engine on fp32, int8 and int4 weights, same process.

    .venv/bin/python -m tests.bench.quant [--quick]

Models (SmolLM2-135M-Instruct): fp32 (the store's default import), int8 (`tandem models quantize
--bits 8`: per channel) and int4 (the built-in GGUF's own Q4_1 projections and Q8_0 head, imported
with --keep-quantized: the integers the fp32 model was dequantized from), and int4a8 (those integers
with `int8_activations`: x quantized to int8 for integer dot products where the CPU has AVX-512 VNNI or AVX2),
and int4kv16 (int4 with `kv_cache_dtype="float16"`: half the cache bytes, as llama.cpp's default f16 cache).
Measures, greedy with EOS
ignored:
  b1        one request x 128 new tokens: tok/s
  batched   32 concurrent requests x 128 new tokens: output tok/s
  prefill   a 512-token prompt to its first token: prompt tok/s
  accuracy  greedy agreement with fp32 over 4 chat prompts x 48 tokens, and perplexity of a held
            text (the README) under each model
and llama.cpp on the same Q4_1 GGUF, the same measures (tests/bench/llama_cpp_ref.py), when
llama-cpp-python is installed (it is not a dependency: its figures appear only where it is).
--quick: 32 new tokens, one repetition.
"""

from __future__ import annotations

import math
import tempfile
from functools import partial
from pathlib import Path

import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.store import ModelStore
from shared.store.builtin import BUILTIN
from tests.bench.common import best_times, emit, environment, log, model_path, parser
from tests.bench.engine import Prompts, tandem_generate
from tests.bench.llama_cpp_ref import LlamaCpp

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity simply.",
             "List three fruits."]  # fmt: skip


def perplexity(engine: LLMEngine, ids: list[int]) -> float:
    """exp(mean NLL) of `ids` by teacher forcing, from the engine's prompt logprobs (one token at a time
    would be slow: the model runs the text as one prompt and scores each next token)."""
    model = engine.model
    with torch.inference_mode():
        from shared.models.attention import VarlenAttention

        x = torch.tensor(ids)
        hidden = model(x, torch.arange(len(ids)), VarlenAttention([len(ids)]))
        logits = model.lm_head(hidden).float()
        nll = torch.nn.functional.cross_entropy(logits[:-1], x[1:])
    return math.exp(nll.item())


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    new_tokens = 32 if args.quick else 128
    fp32_path = model_path(args)
    work = Path(tempfile.mkdtemp(prefix="tandem-quant-"))
    store = ModelStore(work)
    log("quantizing (int8 per channel) and importing the GGUF's Q4_1 integers ...")
    from shared.store.quantize import quantize

    store.create("int8", "bench", lambda d: quantize(fp32_path, d, 8))
    gguf = BUILTIN[args.model].locate() if args.model in BUILTIN else None
    if gguf is None:
        raise SystemExit(f"{args.model} is not a built-in GGUF model")
    store.import_gguf(gguf, "int4", keep_quantized=True)
    engines = {
        "fp32": LLMEngine.from_store(fp32_path, EngineConfig()),
        "int8": LLMEngine.from_store(store.path("int8"), EngineConfig()),
        "int4": LLMEngine.from_store(store.path("int4"), EngineConfig()),
        # the same integers with int8 activations and integer dot products (VNNI or AVX2, 1-4 rows)
        "int4a8": LLMEngine.from_store(store.path("int4"), EngineConfig(int8_activations=True)),
        "int4kv16": LLMEngine.from_store(store.path("int4"), EngineConfig(kv_cache_dtype="float16")),
    }
    results = {"model": args.model, "new_tokens": new_tokens, **environment(args)}
    prompts = Prompts(engines["fp32"].model.config.vocab_size)
    for e in engines.values():
        tandem_generate(e, [prompts(16)], 4)  # warm up

    tok = engines["fp32"].tokenizer
    chats = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = SamplingParams(max_tokens=48, temperature=0)
    want = [o.output_token_ids for o in engines["fp32"].generate(chats, greedy)]
    held = tok.encode(Path(__file__).resolve().parents[2].joinpath("README.md").read_text())[:512]
    for name, engine in engines.items():
        got = [o.output_token_ids for o in engine.generate(chats, greedy)]
        agree = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=False))
        results[f"{name}_greedy_agreement"] = round(agree / sum(len(w) for w in want), 3)
        # a whole-text forward has >4 rows and no cache: int4a8 and int4kv16 would give int4's figure
        if name not in ("int4a8", "int4kv16"):
            results[f"{name}_perplexity"] = round(perplexity(engine, held), 3)
        results[f"{name}_weight_mb"] = round(
            sum(t.numel() * t.element_size() for t in [*engine.model.parameters(), *engine.model.buffers()])
            / 2**20,
            1,
        )

    ref = LlamaCpp.load(gguf, args.threads, max_seqs=32, max_len=512 + 16)
    generate = {name: partial(tandem_generate, engine) for name, engine in engines.items()}
    if ref is None:
        results["llama_cpp"] = "not installed"
    else:
        got = ref.generate(chats, 48)
        agree = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=False))
        results["llama_cpp_greedy_agreement"] = round(agree / sum(len(w) for w in want), 3)
        ref.generate([prompts(16)], 4)  # warm up
        generate["llama_cpp"] = ref.generate

    # each measure takes turns over the models, so a noisy spell does not land on one side only
    one = [prompts(32)]
    batch = [prompts(32) for _ in range(32)]
    measures = {  # kind: (call, tokens counted, repetitions)
        "b1": (lambda gen: gen(one, new_tokens), new_tokens, repeats + 1),
        "batched": (lambda gen: gen(batch, new_tokens), 32 * new_tokens, repeats),
        "prefill": (lambda gen: gen([prompts(512)], 1), 512, max(repeats, 3)),  # fresh prompts: no cache
    }
    for kind, (call, tokens, reps) in measures.items():
        log(f"{kind}: {', '.join(generate)}")
        times = best_times({name: partial(call, gen) for name, gen in generate.items()}, reps)
        for name, t in times.items():
            results[f"{name}_{kind}_tok_s"] = round(tokens / t, 1)
        for name in ("int8", "int4", "int4a8", "int4kv16"):
            results[f"{name}_{kind}_ratio"] = round(
                results[f"{name}_{kind}_tok_s"] / results[f"fp32_{kind}_tok_s"], 3
            )
            if ref is not None and name != "int8":
                results[f"{name}_{kind}_vs_llama_cpp"] = round(
                    results[f"{name}_{kind}_tok_s"] / results[f"llama_cpp_{kind}_tok_s"], 3
                )
    if ref is not None:
        ref.close()
    emit(results)
    return results


if __name__ == "__main__":
    main()
