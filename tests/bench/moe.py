"""Expert-parallel MoE benchmark: decode throughput with ep_size 2 vs 1, and the all-to-all time per
MoE layer.

    .venv/bin/python -m tests.bench.moe [--quick]

The model is SmolLM2-135M-Instruct upcycled to 8 experts, top-2, σ = 0.05 (4 experts with --quick),
made once in the store as `smollm2-moe8-bench`. 8 chat prompts, 32 greedy tokens each (EOS ignored;
16 with --quick).
  ep1  one engine process with 2 torch threads runs all 8 requests;
  ep2  two shard processes (1 torch thread each, gloo on CPU) each run 4 of the requests with
       data-parallel attention and half the experts, exchanging routed tokens per MoE layer.
tok/s = generated tokens / wall time of the generation (prefill included, the same for both).
all_to_all_ms_per_layer: time inside the per-layer collectives (counts, hidden states out, results
back) per MoE layer call, averaged over both shards; it includes waiting for the other shard.
bytes_per_token_per_layer: hidden-state bytes one routed token sends out and gets back.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.store import ModelStore
from tests.bench.common import emit, environment, log, model_path, parser

QUESTIONS = ["What is rain?", "Name a fruit.", "Why is the sky blue?", "What is a CPU?",
             "Describe a cat.", "What is gravity?", "Who writes poems?", "What is bread?"]  # fmt: skip


def shard(rank: int, world: int, init: str, model_dir: str, prompts, new_tokens: int, out: str) -> None:
    from shared.parallel.expert_parallel import moe_layers, shard_experts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    engine = LLMEngine.from_store(Path(model_dir), EngineConfig(kv_cache_bytes=64 * 2**20))
    shard_experts(engine.model)
    mine = prompts[rank::world]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([mine[0]], SamplingParams(max_tokens=2, temperature=0.0))  # warm up (lock-step too)
    layers = moe_layers(engine.model)
    for m in layers:
        m.comm_seconds, m.calls, m.comm_bytes = 0.0, 0, 0
    dist.barrier()
    t0 = time.perf_counter()
    outs = engine.generate(mine, params)
    elapsed = time.perf_counter() - t0
    comm = sum(m.comm_seconds for m in layers)
    calls = sum(m.calls for m in layers)
    tokens = sum(len(o.output_token_ids) for o in outs)
    torch.save({"elapsed": elapsed, "tokens": tokens, "comm": comm, "calls": calls,
                "imbalance": max(m.imbalance() for m in layers)}, Path(out) / f"rank{rank}.pt")  # fmt: skip
    dist.barrier()
    os._exit(0)  # skip gloo's teardown at exit, which can abort after the work is saved


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    experts = 4 if args.quick else 8
    new_tokens = 16 if args.quick else 32
    base = model_path(args)
    store = ModelStore(base.parent)
    name = f"smollm2-moe{experts}-bench"
    if not store.has(name):
        from shared.store.upcycle import upcycle

        log(f"upcycling {args.model} into {name} ...")
        store.create(name, "bench", lambda d: upcycle(base, d, experts, 2, 0, 0.05))
    path = store.path(name)
    ep1 = LLMEngine.from_store(path, EngineConfig(kv_cache_bytes=64 * 2**20))
    prompts = [ep1.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    hidden = ep1.model.config.hidden_size
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ep1.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))
    t0 = time.perf_counter()
    outs = ep1.generate(prompts, params)
    ep1_s = time.perf_counter() - t0
    ep1_tok = sum(len(o.output_token_ids) for o in outs)
    del ep1
    log(f"ep1: {ep1_tok / ep1_s:.1f} tok/s")

    import torch.multiprocessing as mp

    tmp = Path(tempfile.mkdtemp(prefix="tandem-moe-"))
    mp.start_processes(shard, args=(2, str(tmp / "init"), str(path), prompts, new_tokens, str(tmp)),
                       nprocs=2, start_method="spawn")  # fmt: skip
    shards = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    ep2_s = max(s["elapsed"] for s in shards)
    ep2_tok = sum(s["tokens"] for s in shards)
    per_layer_ms = 1000 * sum(s["comm"] for s in shards) / sum(s["calls"] for s in shards)
    results = {
        "model": name,
        "experts": experts,
        "top_k": 2,
        "requests": len(prompts),
        "new_tokens": new_tokens,
        "ep1_tok_s": round(ep1_tok / ep1_s, 2),
        "ep2_tok_s": round(ep2_tok / ep2_s, 2),
        "ratio": round((ep2_tok / ep2_s) / (ep1_tok / ep1_s), 3),
        "all_to_all_ms_per_layer": round(per_layer_ms, 3),
        "all_to_all_fraction": round(sum(s["comm"] for s in shards) / sum(s["elapsed"] for s in shards), 3),
        "bytes_per_token_per_layer": 2 * 2 * hidden * 4,  # k=2 routed copies, out and back, fp32
        "expert_imbalance_max_over_mean": round(max(s["imbalance"] for s in shards), 2),
        **environment(args),
    }
    emit(results)
    return results


if __name__ == "__main__":
    main()
