"""The optimizer step, the same on one process or on every worker of a data-parallel group.

    step(micro_batches, global_count):
        for each micro-batch: forward → objective sum (+ balancing loss) → backward (no grad sync
                              except on the last micro-batch)
        clip → AdamW step → schedule step → MoE bias update → metrics reduced over workers

`TrainingModel` is what DDP / FSDP wrap: the causal LM plus its objective, so the whole loss sits
inside the wrapped forward. The objective sum is divided by `global_count` (targets, or pairs for
DPO, over the whole global batch) and multiplied by the world size, because DDP averages gradients
over workers: the result is the gradient of the global mean loss, whatever the split (see
objectives.py). Checkpoints hold the trainable tensors (all weights, or the LoRA weights), the
optimizer and the schedule, through torch.distributed.checkpoint's state-dict API so the same code
serves a plain module, DDP and FSDP.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint

from shared.models.moe import SparseMoE
from shared.models.transformer import CausalLM
from shared.train.config import JobError, TrainJob
from shared.train.data import Batch
from shared.train.lora import adapters_disabled, apply_lora
from shared.train.objectives import dpo_loss, moe_balance_loss, sequence_logprobs, target_logprobs
from shared.train.schedule import lr_multiplier

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"


class TrainingModel(nn.Module):
    def __init__(self, lm: CausalLM, objective: str, beta: float):
        super().__init__()
        self.lm = lm
        self.objective = objective
        self.beta = beta

    def forward(self, batch: Batch, reference: torch.Tensor | None = None):
        """(objective sum, balancing loss or None, stats) for one micro-batch."""
        logps = target_logprobs(self.lm, batch)  # [N]
        if self.objective == "dpo":
            total, stats = dpo_loss(sequence_logprobs(logps, batch), reference, self.beta)
        else:
            total, stats = -logps.sum(), {}
        return total, moe_balance_loss(self.lm), stats


def prepare_model(model: CausalLM, job: TrainJob) -> CausalLM:
    """Put a loaded (frozen, eval) model in training shape: LoRA or all weights trainable, and
    activation checkpointing around each decoder layer if asked."""
    model.train()
    if job.method == "lora":
        apply_lora(model, job.lora)
    else:
        model.requires_grad_(True)
    if job.moe.bias_update_rate > 0:
        moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
        if not moes or any(m.gate.e_score_correction_bias is None for m in moes):
            raise JobError(
                "moe.bias_update_rate: auxiliary-loss-free balancing needs a model whose router has a "
                "score-correction bias (sigmoid routing, DeepSeek-V3 style); use moe.aux_loss_coef"
            )
    if job.hyperparameters.activation_checkpointing:
        for layer in model.model.layers:
            layer.forward = _checkpointed(layer.forward)
    return model


def _checkpointed(forward):
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False)

    return run


class Trainer:
    def __init__(self, model: CausalLM, job: TrainJob, total_steps: int, device: torch.device, wrap=None):
        self.job, self.hp, self.device = job, job.hyperparameters, device
        self.lm = model
        self.total_steps = total_steps
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.reference = None
        if job.objective == "dpo" and job.method == "full":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.module = TrainingModel(model, job.objective, job.dpo.beta)
        self.wrapped = wrap(self.module) if wrap else self.module
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hp.learning_rate,
            betas=self.hp.betas,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(self.hp, total_steps)
        )
        self.moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
        self.autocast = _autocast(self.hp.bf16, device)

    # -- one optimizer step ------------------------------------------------------------------------

    def step(self, micro_batches: list[Batch], global_count: int) -> dict:
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        objective = torch.zeros((), dtype=torch.float64)
        balance = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        counts = torch.zeros(len(self.moes), self.moes[0].moe.num_experts) if self.moes else None
        stats: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            last = i == len(micro_batches) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(self.wrapped, "no_sync")
                else self.wrapped.no_sync()
            )
            with sync:
                with self.autocast:
                    reference = self._reference_logprobs(batch)
                    total, aux, batch_stats = self.wrapped(batch, reference)
                    loss = total / global_count * self.world
                    if aux is not None and self.job.moe.aux_loss_coef > 0:
                        loss = loss + self.job.moe.aux_loss_coef * aux / len(micro_batches)
                if counts is not None:
                    counts += torch.stack([m.last_expert_counts.float().cpu() for m in self.moes])
                loss.backward()
            objective += float(total.detach())
            balance += float(aux.detach()) / len(micro_batches) if aux is not None else 0.0
            tokens += batch.num_tokens
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + v
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        summed = self._all_reduce(
            torch.stack(
                [objective, balance, tokens, *(torch.tensor(v, dtype=torch.float64) for v in stats.values())]
            )
        )
        if counts is not None:
            counts = self._all_reduce(counts)
            self._update_router_bias(counts)
        elapsed = time.perf_counter() - start
        metrics = {
            "loss": float(summed[0]) / global_count,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens": int(summed[2]),
            "tokens_per_s": float(summed[2]) / elapsed,
            "step_time_s": elapsed,
        }
        for k, v in zip(stats, summed[3:], strict=True):
            if k.endswith("_sum"):
                metrics[k.removesuffix("_sum")] = float(v) / global_count
        if counts is not None:
            metrics["moe_balance_loss"] = float(summed[1]) / self.world
            load = counts.sum(dim=0)
            metrics["expert_imbalance"] = float(load.max() / load.mean().clamp(min=1e-9))
            metrics["expert_counts"] = counts.int().tolist()
        return metrics

    @torch.no_grad()
    def evaluate(self, micro_batches: list[Batch], global_count: int) -> float:
        """The objective over held-out batches (this worker's share; summed over workers), no update."""
        total = torch.zeros(1, dtype=torch.float64)
        for batch in micro_batches:
            batch = batch.to(self.device)
            with self.autocast:
                value, _, _ = self.wrapped(batch, self._reference_logprobs(batch))
            total += float(value)
        return float(self._all_reduce(total)[0]) / max(global_count, 1)

    def _reference_logprobs(self, batch: Batch) -> torch.Tensor | None:
        if self.job.objective != "dpo":
            return None
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logprobs(target_logprobs(self.reference, batch), batch)
            with adapters_disabled(self.lm):
                return sequence_logprobs(target_logprobs(self.lm, batch), batch)

    def _clip(self) -> float:
        max_norm = self.hp.max_grad_norm or math.inf
        if hasattr(self.wrapped, "clip_grad_norm_"):  # FSDP computes the norm over shards
            return float(self.wrapped.clip_grad_norm_(max_norm))
        params = [p for p in self.wrapped.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def _update_router_bias(self, counts: torch.Tensor) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts."""
        rate = self.job.moe.bias_update_rate
        if rate <= 0:
            return
        with torch.no_grad():
            for m, load in zip(self.moes, counts, strict=True):
                bias = m.gate.e_score_correction_bias
                bias += rate * torch.sign(load.mean() - load).to(bias.device, bias.dtype)

    # -- checkpoints --------------------------------------------------------------------------------

    def trainable_names(self) -> set[str]:
        names = {n for n, p in self.lm.named_parameters() if p.requires_grad}
        if self.job.moe.bias_update_rate > 0:
            names |= {n for n, _ in self.lm.named_buffers() if n.endswith("e_score_correction_bias")}
        return names

    def save(self, directory: Path, step: int, write: bool) -> None:
        """Gather the state (a collective: every worker calls it); `write` on one worker writes it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.wrapped, options=options)
        optim_state = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        if not write:
            return
        keep = {_lm_name(k): v for k, v in model_state.items() if _lm_name(k) in self.trainable_names()}
        directory = Path(directory)
        save_file({k: v.contiguous() for k, v in keep.items()}, str(directory / TRAINABLE))
        torch.save(optim_state, directory / OPTIMIZER)
        (directory / STATE).write_text(
            json.dumps(
                {"step": step, "scheduler": self.scheduler.state_dict(), "total_steps": self.total_steps}
            )
        )

    def load(self, directory: Path) -> int:
        """Restore a checkpoint written by `save`; returns the step to continue from."""
        directory = Path(directory)
        trainable = {"lm." + k: v for k, v in load_file(str(directory / TRAINABLE)).items()}
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.wrapped, trainable, options=options)
        optim_state = torch.load(directory / OPTIMIZER, weights_only=True)  # tensors and plain values only
        set_optimizer_state_dict(self.wrapped, self.optimizer, optim_state, options=options)
        state = json.loads((directory / STATE).read_text())
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])


def read_trainable(directory: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a checkpoint, by the language model's own parameter names."""
    return load_file(str(Path(directory) / TRAINABLE))


def read_step(directory: Path) -> int:
    return int(json.loads((Path(directory) / STATE).read_text())["step"])


def _lm_name(key: str) -> str:
    return key.removeprefix("module.").removeprefix("lm.")


def _autocast(mode: str, device: torch.device):
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "on" or (mode == "auto" and supported):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
