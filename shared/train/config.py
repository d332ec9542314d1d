"""A training job's spec: what to train, on what data, how, and where the result goes.

    model: smollm2-135m-instruct           # base model, by name in the model store
    objective: sft                         # pretrain | sft | dpo
    method: lora                           # full | lora
    training_file: data/train.jsonl        # relative paths are relative to the YAML file
    output_name: smollm2-support           # the servable model this job adds to the store
    hyperparameters: {batch_size: 8, micro_batch_size: 4, learning_rate: 2.0e-4, max_steps: 100, ...}
    lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    dpo: {beta: 0.1}
    moe: {aux_loss_coef: 0.01, bias_update_rate: 0.0}
    scaling: {num_workers: 2, use_gpu: false, threads_per_worker: 1, strategy: ddp}
    checkpoint: {every_steps: 50, keep: 2}

`load_job(path)` parses YAML with pydantic (the external edge) and reports every problem as a
JobError naming the field, e.g. `hyperparameters.learning_rate: Input should be greater than 0`.
The parsed models are frozen; the trainer receives them as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared import envs
from shared.core.errors import field_problems


class JobError(ValueError):
    """A job spec or dataset that cannot run; the message names the field or the file and line."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hyperparameters(_Spec):
    batch_size: int = Field(
        8, gt=0, description="examples (sequences, or preference pairs) per optimizer step"
    )
    micro_batch_size: int = Field(4, gt=0, description="examples per forward/backward on one worker")
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many steps (overrides epochs)")
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of steps spent decaying")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_seq_len: int = Field(1024, gt=1)
    seed: int = 0
    bf16: Literal["auto", "on", "off"] = "auto"
    activation_checkpointing: bool = False


class LoraSpec(_Spec):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


class DpoSpec(_Spec):
    beta: float = Field(0.1, gt=0)


class MoeSpec(_Spec):
    aux_loss_coef: float = Field(0.01, ge=0, description="Switch-style load-balancing loss weight")
    bias_update_rate: float = Field(
        0.0, ge=0, description="DeepSeek's auxiliary-loss-free balancing: bias step per optimizer step"
    )


class Scaling(_Spec):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    threads_per_worker: int = Field(1, gt=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _fsdp_needs_gpu(self):
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("strategy fsdp needs use_gpu: true (FSDP is a GPU path)")
        return self


class CheckpointSpec(_Spec):
    every_steps: int = Field(50, gt=0)
    keep: int = Field(2, gt=0)


class TrainJob(_Spec):
    model: str
    objective: Literal["pretrain", "sft", "dpo"]
    training_file: Path
    output_name: str
    validation_file: Path | None = None  # held-out examples: their loss is logged after the last step
    method: Literal["full", "lora"] = "full"
    model_store: Path | None = None  # default: $TANDEM_MODELS
    output_dir: Path | None = (
        None  # the job's checkpoints and metrics; default: $TANDEM_HOME/jobs/<output_name>
    )
    hyperparameters: Hyperparameters = Hyperparameters()
    lora: LoraSpec = LoraSpec()
    dpo: DpoSpec = DpoSpec()
    moe: MoeSpec = MoeSpec()
    scaling: Scaling = Scaling()
    checkpoint: CheckpointSpec = CheckpointSpec()

    @model_validator(mode="after")
    def _batches_divide(self):
        hp, n = self.hyperparameters, self.scaling.num_workers
        if hp.batch_size % n:
            raise ValueError(
                f"hyperparameters.batch_size ({hp.batch_size}) must divide by scaling.num_workers ({n})"
            )
        return self

    def store_root(self) -> Path:
        return Path(self.model_store).expanduser() if self.model_store else envs.models_dir()

    def job_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir).expanduser()
        return envs.tandem_home() / "jobs" / self.output_name


def parse_job(raw: object, base_dir: Path | None = None) -> TrainJob:
    """A TrainJob from already-parsed YAML/JSON; relative paths resolve against base_dir."""
    if not isinstance(raw, dict):
        raise JobError(f"a job spec must be a mapping, got {type(raw).__name__}")
    try:
        job = TrainJob.model_validate(raw)
    except ValidationError as e:
        raise JobError(field_problems(e, "job")) from e
    if base_dir is not None:
        fix = {}
        for key in ("training_file", "validation_file", "model_store", "output_dir"):
            value = getattr(job, key)
            if value is not None and not Path(value).expanduser().is_absolute():
                fix[key] = (base_dir / value).resolve()
        job = job.model_copy(update=fix)
    return job


def load_job(path: Path) -> TrainJob:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise JobError(f"cannot read job spec {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise JobError(f"{path}: not valid YAML ({e})") from e
    return parse_job(raw, path.parent.resolve())
