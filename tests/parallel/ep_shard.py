"""What one shard of an expert-parallel test group runs (in its own process, joined over gloo)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist


def run_shard(rank: int, world: int, init_file: str, task: str, args: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = TASKS[task](rank, world, **args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


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


TASKS = {"logits": logits_task, "generate": generate_task}


def run_group(world: int, task: str, args: dict, tmp: Path) -> list[dict]:
    """Spawn `world` shards running `task`; their results, by rank."""
    import torch.multiprocessing as mp

    init = tmp / "init"
    init.unlink(missing_ok=True)
    mp.start_processes(
        run_shard, args=(world, str(init), task, args, str(tmp)), nprocs=world, start_method="spawn"
    )
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
