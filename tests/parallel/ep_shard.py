"""What one shard of an expert-parallel test group runs (in its own process, joined over gloo)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist


def run_shard(rank: int, world: int, init_file: str, task: str, args: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = TASKS[task](rank, world, **args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    # Leave without running C++ destructors: tearing gloo down at interpreter exit sometimes aborts
    # ("terminate called without an active exception") after the work is done and saved.
    os._exit(0)


def logits_task(rank, world, model_dir, sequences):
    """Each shard runs its own sequence (data-parallel attention) through the sharded model; then
    every MoE layer once more with shard 0's hidden states on shard 0 and none on the others."""
    from shared.models.attention import VarlenAttention
    from shared.models.loader import load_model
    from shared.models.moe import SparseMoE
    from shared.parallel.expert_parallel import moe_layers, shard_experts

    model = load_model(Path(model_dir))
    dense_moes = [copy.deepcopy(m) for m in model.modules() if isinstance(m, SparseMoE)]
    shard_experts(model)
    seq = torch.tensor(sequences[rank])
    with torch.no_grad():
        logits = model.compute_logits(model(seq, torch.arange(len(seq)), VarlenAttention([len(seq)])))
        torch.manual_seed(1)
        x = torch.randn(7, model.config.hidden_size)
        empty = []
        for dense, sharded in zip(dense_moes, moe_layers(model), strict=True):
            got = sharded(x if rank == 0 else x[:0])
            if rank == 0:
                empty.append((got - dense(x)).abs().max().item())
    counts = [m.expert_tokens.clone() for m in moe_layers(model)]
    return {"logits": logits, "empty_shard_max_diff": empty, "expert_tokens": counts}


def generate_task(rank, world, model_dir, prompts, max_tokens):
    """A greedy engine per shard over the sharded model; equal step counts keep them in lock-step."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams
    from shared.parallel.expert_parallel import shard_experts

    engine = LLMEngine.from_store(Path(model_dir), EngineConfig(kv_cache_bytes=32 * 2**20))
    shard_experts(engine.model)
    out = engine.generate(
        [prompts[rank]], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )
    return {"tokens": out[0].output_token_ids}


def staggered(engine, prompts, max_tokens, first: int = 2, after_steps: int = 3):
    """Run prompts with arrivals at different steps: `first` now, the rest after a few steps."""
    from shared.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[int, list[int]] = {}
    for i in range(first):
        engine.add_request(f"g{i}", prompts[i], params)
    steps = 0
    while engine.has_unfinished() or len(tokens) < len(prompts):
        if steps == after_steps:
            for i in range(first, len(prompts)):
                engine.add_request(f"g{i}", prompts[i], params)
        for out in engine.step():
            if out.finished:
                tokens[int(out.request_id[1:])] = out.output_token_ids
        steps += 1
    return [tokens[i] for i in range(len(prompts))]


def group_task(rank, world, model_dir, prompts, max_tokens):
    """One scheduler (rank 0's engine) drives the group; the others follow in lock-step."""
    from shared.engine import EngineConfig, LLMEngine
    from shared.parallel.expert_parallel import moe_layers, shard_experts
    from shared.parallel.group_runner import follow, lead

    config = EngineConfig(kv_cache_bytes=32 * 2**20, enable_prefix_caching=False, long_prefill_chunk=8,
                          max_num_batched_tokens=24)  # fmt: skip
    engine = LLMEngine.from_store(Path(model_dir), config)
    shard_experts(engine.model)
    if rank != 0:
        steps = follow(engine.runner)
        return {
            "steps": steps,
            "expert_tokens": sum(int(m.expert_tokens.sum()) for m in moe_layers(engine.model)),
        }
    runner = lead(engine)
    try:
        tokens = staggered(engine, prompts, max_tokens)
    finally:
        runner.close()
    return {"tokens": tokens, "steps": runner.steps, "assigned": sorted(set(runner.shard_of.values()))}


def group_handoff_task(rank, world, model_dir, prompts, max_tokens):
    """A disaggregated decode into the group: an unsharded prefill-only engine (in the leader's
    process, no collectives) hands its KV over; the group continues each request alongside others."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams
    from shared.parallel.expert_parallel import shard_experts
    from shared.parallel.group_runner import follow, lead

    config = EngineConfig(kv_cache_bytes=32 * 2**20, enable_prefix_caching=False)
    engine = LLMEngine.from_store(Path(model_dir), config)
    shard_experts(engine.model)
    if rank != 0:
        return {"steps": follow(engine.runner)}
    runner = lead(engine)
    prefill = LLMEngine.from_store(Path(model_dir), EngineConfig(kv_cache_bytes=32 * 2**20))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    try:
        for i, prompt in enumerate(prompts):
            prefill.add_request(f"p{i}", prompt, params, prefill_only=True)
            handoff = None
            while prefill.has_unfinished():
                for out in prefill.step():
                    handoff = out.kv_handoff or handoff
            engine.add_request(f"g{i}", prompt, params, kv_handoff=handoff)
        tokens = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens[int(out.request_id[1:])] = out.output_token_ids
    finally:
        runner.close()
    return {
        "tokens": [tokens[i] for i in range(len(prompts))],
        "shards": sorted(set(runner.shard_of.values())),
    }


def group_prefix_task(rank, world, model_dir, prompts, max_tokens):
    """The group with prefix caching on: requests sharing a long prefix, arriving while others run."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams
    from shared.parallel.expert_parallel import shard_experts
    from shared.parallel.group_runner import follow, lead

    engine = LLMEngine.from_store(
        Path(model_dir), EngineConfig(kv_cache_bytes=32 * 2**20, long_prefill_chunk=32)
    )
    shard_experts(engine.model)
    if rank != 0:
        return {"steps": follow(engine.runner)}
    runner = lead(engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens, cached, placed = {}, {}, {}
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"g{i}", prompt, params)
            for _ in range(3):  # the next request arrives while this one still runs
                for out in engine.step():
                    tokens[out.request_id], cached[out.request_id] = (
                        out.output_token_ids,
                        out.num_cached_tokens,
                    )
                placed.update(runner.shard_of)
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id], cached[out.request_id] = out.output_token_ids, out.num_cached_tokens
            placed.update(runner.shard_of)
    finally:
        runner.close()
    ids = [f"g{i}" for i in range(len(prompts))]
    return {
        "tokens": [tokens[i] for i in ids],
        "cached": [cached[i] for i in ids],
        "shards": [placed[i] for i in ids],
    }


TASKS = {
    "logits": logits_task,
    "generate": generate_task,
    "group": group_task,
    "group_handoff": group_handoff_task,
    "group_prefix": group_prefix_task,
}


def run_group(world: int, task: str, args: dict, tmp: Path) -> list[dict]:
    """Spawn `world` shards running `task`; their results, by rank."""
    import torch.multiprocessing as mp

    init = tmp / "init"
    init.unlink(missing_ok=True)
    mp.start_processes(
        run_shard, args=(world, str(init), task, args, str(tmp)), nprocs=world, start_method="spawn"
    )
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
