"""The per-worker training loop that Ray Train's TorchTrainer runs on each of `num_workers` workers.

    load the base model from the store → LoRA / full → wrap for DDP or FSDP (ray.train.torch)
    → restore the latest checkpoint if Ray hands one over → for each step: this worker's
    micro-batches → Trainer.step → metrics; at a checkpoint step ray.train.report(metrics, checkpoint)

Ray Train has already joined the workers in a torch.distributed group (gloo on CPU, NCCL on GPU).
Worker 0 writes every step's metrics to <job dir>/metrics.jsonl (what the controller and the CLI
read). Workers report to Ray only at checkpoint steps (every worker: report is a barrier), with the
checkpoint worker 0 attaches, which Ray persists under <job dir>/run/: a report waits until Ray's
controller has taken the previous one, which it polls for every 2 s, so reporting every step would
hold fast steps (a small model, a GPU) to one per poll.
Running the same job again finds that run and resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from shared.models.loader import load_model
from shared.models.moe import SparseMoE
from shared.train.config import TrainJob
from shared.train.data import BatchPlan, Example, collate
from shared.train.trainer import Trainer, prepare_model

log = logging.getLogger("tandem.train")

METRICS = "metrics.jsonl"


def plan_for(job: TrainJob, num_examples: int) -> BatchPlan:
    hp = job.hyperparameters
    return BatchPlan(num_examples, hp.batch_size, hp.micro_batch_size, hp.epochs, hp.max_steps, hp.seed)


def global_count(job: TrainJob, examples: list[Example], indices: list[int]) -> int:
    """What the step's loss is averaged over: target tokens, or preference pairs for DPO."""
    if job.objective == "dpo":
        return len(indices)
    return sum(examples[i].num_targets for i in indices)


def train_loop_per_worker(config: dict) -> None:
    job = TrainJob.model_validate(config["job"])
    examples: list[Example] = config["examples"]
    until_step: int | None = config.get("until_step")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.scaling.threads_per_worker)
    device = ray.train.torch.get_device() if job.scaling.use_gpu else torch.device("cpu")
    torch.manual_seed(job.hyperparameters.seed)

    model = prepare_model(load_model(Path(config["base_dir"]), device=device), job)
    plan = plan_for(job, len(examples))
    trainer = Trainer(model, job, plan.total_steps, device, wrap=_wrapper(job, model, device))
    start = _restore(trainer, rank)
    metrics_file = Path(config["job_dir"]) / METRICS
    if rank == 0:
        _truncate_metrics(metrics_file, start)

    for step in range(start, plan.total_steps):
        parts = plan.micro_batches(step, rank, world)
        count = global_count(job, examples, plan.global_indices(step))
        metrics = trainer.step([collate([examples[i] for i in part]) for part in parts], count)
        metrics["step"] = step + 1
        metrics["total_steps"] = plan.total_steps
        done = step + 1 == plan.total_steps or step + 1 == until_step
        if done and config.get("validation"):
            metrics["valid_loss"] = validation_loss(trainer, job, config["validation"], rank, world)
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info(
                "step %d/%d loss %.4f lr %.2e",
                step + 1,
                plan.total_steps,
                metrics["loss"],
                metrics["learning_rate"],
            )
        if done or (step + 1) % job.checkpoint.every_steps == 0:
            _report(trainer, metrics, rank)
        if done:
            break


def _wrapper(job: TrainJob, model: torch.nn.Module, device: torch.device):
    """How Ray Train wraps a module for the job's strategy (DDP or FSDP) on `device`."""
    if job.scaling.strategy == "fsdp":
        # LoRA mixes frozen and trainable weights in a layer: FSDP must keep the original parameters
        kwargs = {"use_orig_params": True}
    elif any(isinstance(m, SparseMoE) for m in model.modules()):
        # experts that get no token in a micro-batch have no gradient: DDP must not wait for them
        kwargs = {"find_unused_parameters": True}
    else:
        kwargs = None

    def wrap(module):
        return ray.train.torch.prepare_model(
            module, move_to_device=device, parallel_strategy=job.scaling.strategy,
            parallel_strategy_kwargs=kwargs,
        )  # fmt: skip

    return wrap


def _restore(trainer: Trainer, rank: int) -> int:
    """Load the checkpoint Ray hands over (a rerun of the job) and return its step; 0 without one."""
    restored = ray.train.get_checkpoint()
    if restored is None:
        return 0
    with restored.as_directory() as d:
        start = trainer.load(Path(d))
    log.info("worker %d resumed from step %d", rank, start)
    return start


def _report(trainer: Trainer, metrics: dict, rank: int) -> None:
    """Report a checkpoint step to Ray (a barrier across workers); worker 0 attaches the checkpoint."""
    reported = {k: v for k, v in metrics.items() if k != "expert_counts"}
    with tempfile.TemporaryDirectory() as d:
        trainer.save(Path(d), metrics["step"], write=rank == 0)
        checkpoint = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        ray.train.report(reported, checkpoint=checkpoint)


def validation_loss(trainer: Trainer, job: TrainJob, examples: list[Example], rank: int, world: int) -> float:
    """The objective over every held-out example, averaged like a step's loss (per target token, or
    per pair for DPO); worker r takes every W-th example."""
    mine = list(range(rank, len(examples), world))
    m = job.hyperparameters.micro_batch_size
    batches = [collate([examples[i] for i in mine[j : j + m]]) for j in range(0, len(mine), m)]
    return trainer.evaluate(batches, global_count(job, examples, list(range(len(examples)))))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past `step` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def read_metrics(job_dir: Path) -> list[dict]:
    path = Path(job_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
