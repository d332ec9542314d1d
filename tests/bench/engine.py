"""Engine benchmark: Tandem's LLMEngine vs transformers `generate`, same model, same process.

    .venv/bin/python -m tests.bench.engine [--quick]

Measures (SmolLM2-135M-Instruct fp32 by default, greedy, EOS ignored so every request runs its
full length):
  batched   32 concurrent requests x 128 new tokens: output tok/s (transformers: one batch of 32)
  b1        one request, 128 new tokens: tok/s, also as a fraction of the memory-bandwidth bound
            (every weight byte is read once per decoded token: bound = copy bandwidth / weight bytes,
            copy bandwidth counting each copied byte once); also against the read-only bandwidth
            of summing a large tensor, a stricter bound
  prefill   a 512-token prompt to its first token: prompt tok/s
  ttft      a 1,024-token prompt cold, then another sharing its first 1,008 tokens (prefix cached)
--quick runs 32 new tokens instead of 128 and one repetition (three of the prefill). Prompts are
random token ids, the same for both sides; each repetition of a prefill uses fresh ids so the prefix
cache cannot help where it should not.
"""

from __future__ import annotations

import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tests.bench.common import (
    best_time,
    copy_bandwidth,
    emit,
    environment,
    log,
    model_path,
    parser,
    read_bandwidth,
)


class Prompts:
    def __init__(self, vocab_size: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size

    def __call__(self, n: int) -> list[int]:
        return torch.randint(100, self.vocab_size, (n,), generator=self.gen).tolist()


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> None:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == ids.shape[1] + new_tokens


def tandem_generate(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> None:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert all(len(o.output_token_ids) == new_tokens for o in outs)


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    new_tokens = 32 if args.quick else 128
    path = model_path(args)

    import transformers

    log("loading transformers and Tandem ...")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = LLMEngine.from_store(path, EngineConfig())
    prompts = Prompts(engine.model.config.vocab_size)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    results = {"model": args.model, "new_tokens": new_tokens, **environment(args)}

    # warm both up (first calls allocate and pick kernels)
    warm = [prompts(16)]
    hf_generate(hf, warm, 4)
    tandem_generate(engine, warm, 4)

    log(f"batched: 32 requests x {new_tokens} tokens")
    batch = [prompts(32) for _ in range(32)]
    hf_t = best_time(lambda: hf_generate(hf, batch, new_tokens), repeats)
    t = best_time(lambda: tandem_generate(engine, batch, new_tokens), repeats)
    results["hf_batched_tok_s"] = round(32 * new_tokens / hf_t, 1)
    results["batched_tok_s"] = round(32 * new_tokens / t, 1)
    results["batched_ratio"] = round(hf_t / t, 3)

    log(f"b1: one request x {new_tokens} tokens")
    one = [prompts(32)]
    hf_t = best_time(lambda: hf_generate(hf, one, new_tokens), repeats)
    t = best_time(lambda: tandem_generate(engine, one, new_tokens), repeats)
    bandwidth = copy_bandwidth()
    results["hf_b1_tok_s"] = round(new_tokens / hf_t, 2)
    results["b1_tok_s"] = round(new_tokens / t, 2)
    results["b1_ratio"] = round(hf_t / t, 3)
    results["weight_bytes"] = weight_bytes
    results["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    results["bandwidth_bound_tok_s"] = round(bandwidth / weight_bytes, 2)
    results["b1_fraction_of_bandwidth_bound"] = round(new_tokens / t / (bandwidth / weight_bytes), 3)
    reads = read_bandwidth()
    results["read_bandwidth_gb_s"] = round(reads / 1e9, 2)
    results["b1_fraction_of_read_bound"] = round(new_tokens / t / (reads / weight_bytes), 3)

    log("prefill: a 512-token prompt")
    # ~1 s each: more repetitions, alternating the two sides, so a slow patch of the machine hits both
    hf_t = t = float("inf")
    for _ in range(max(3, 3 * repeats)):
        hf_t = min(hf_t, best_time(lambda: hf_generate(hf, [prompts(512)], 1), 1))
        t = min(t, best_time(lambda: tandem_generate(engine, [prompts(512)], 1), 1))
    results["hf_prefill_tok_s"] = round(512 / hf_t, 1)
    results["prefill_tok_s"] = round(512 / t, 1)
    results["prefill_ratio"] = round(hf_t / t, 3)

    log("ttft: a 1,024-token prompt cold, then with its first 1,008 tokens cached")
    cold, cached = float("inf"), float("inf")
    for _ in range(repeats):
        base = prompts(1024)
        cold = min(cold, best_time(lambda b=base: tandem_generate(engine, [b], 1), 1))
        cached = min(
            cached, best_time(lambda b=base: tandem_generate(engine, [b[:1008] + prompts(16)], 1), 1)
        )
    results["ttft_cold_s"] = round(cold, 4)
    results["ttft_cached_s"] = round(cached, 4)
    results["prefix_ttft_speedup"] = round(cold / cached, 2)
    assert engine.pool.num_free == engine.pool.num_blocks, "the benchmark leaked KV blocks"
    emit(results)
    return results


if __name__ == "__main__":
    main()
