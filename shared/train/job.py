"""Running a training job: validate → train on Ray Train → publish the result to the model store.

    prepare(job)   base model in the store, output name free, the whole dataset validated and
                   tokenized (any bad line fails here, before a worker starts)
    run_job(job)   a TorchTrainer of `scaling.num_workers` workers over train_loop_per_worker;
                   the run lives in <job dir>/run, so running the same job again resumes it
    publish        the final checkpoint becomes a servable model: a full checkpoint in the base's
                   own layout (tensor names as the base checkpoint has them), or a LoRA adapter in
                   the PEFT format that names its base

`until_step` stops early with a checkpoint (time-sliced or preemptible jobs); the next run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.models import quant
from shared.models.loader import plan_checkpoint, read_config
from shared.store import ModelStore, StoreError
from shared.tokenizer import Tokenizer
from shared.train.config import JobError, TrainJob
from shared.train.data import Example, load_dataset
from shared.train.loop import plan_for, read_metrics, train_loop_per_worker
from shared.train.lora import save_adapter
from shared.train.trainer import read_step, read_trainable

_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
SPEC = "job.json"


@dataclass
class JobResult:
    status: str  # succeeded | stopped
    step: int
    total_steps: int
    job_dir: Path
    model: str | None = None
    metrics: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        last = self.metrics[-1] if self.metrics else {}
        return {
            "status": self.status,
            "step": self.step,
            "total_steps": self.total_steps,
            "model": self.model,
            "job_dir": str(self.job_dir),
            "first_loss": self.metrics[0]["loss"] if self.metrics else None,
            "final_loss": last.get("loss"),
            "valid_loss": last.get("valid_loss"),
        }


def prepare(job: TrainJob) -> tuple[ModelStore, list[Example]]:
    store = ModelStore(job.store_root())
    try:
        base = store.get(job.model)
    except StoreError as e:
        raise JobError(f"model: {e}") from e
    if base.base_model:
        raise JobError(f"model: '{job.model}' is a LoRA adapter; train on its base '{base.base_model}'")
    if quant.config_of(json.loads((store.path(job.model) / "config.json").read_text())) is not None:
        raise JobError(
            f"model: '{job.model}' has quantized weights (serving only); train on its float original"
        )
    if store.has(job.output_name):
        raise JobError(f"output_name: model '{job.output_name}' already exists in the store at {store.root}")
    if not base.has_tokenizer:
        raise JobError(f"model: '{job.model}' has no tokenizer in the store")
    tok = Tokenizer.from_dir(store.path(job.model))
    if job.objective != "pretrain" and not tok.chat_template:
        raise JobError(f"objective: {job.objective} needs a chat template, and '{job.model}' has none")
    examples = load_dataset(job.training_file, job.objective, tok, job.hyperparameters.max_seq_len)
    if job.validation_file is not None:
        load_dataset(job.validation_file, job.objective, tok, job.hyperparameters.max_seq_len)
    plan = plan_for(job, len(examples))
    if plan.steps_per_epoch == 0:
        raise JobError(
            f"hyperparameters.batch_size: {job.hyperparameters.batch_size} is larger than the "
            f"{len(examples)} examples in {job.training_file}"
        )
    return store, examples


def run_job(job: TrainJob, until_step: int | None = None, address: str | None = None) -> JobResult:
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store, examples = prepare(job)
    job_dir = job.job_dir().resolve()
    job = job.model_copy(update={"model_store": store.root.resolve(), "output_dir": job_dir})
    _claim_job_dir(job, job_dir)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            num_cpus=None if address else max(os.cpu_count() or 1, job.scaling.num_workers),
            include_dashboard=False,
            configure_logging=False,
        )
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": job.model_dump(mode="json"),
                "examples": examples,
                "validation": _validation_examples(job, store),
                "until_step": until_step,
                "job_dir": str(job_dir),
                "base_dir": str(store.path(job.model)),
            },
            scaling_config=ScalingConfig(
                num_workers=job.scaling.num_workers,
                use_gpu=job.scaling.use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": 1} if job.scaling.use_gpu else {})},
            ),
            run_config=RunConfig(
                name="run",
                storage_path=str(job_dir),
                checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep),
            ),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    if result.error is not None:
        raise JobError(f"training failed: {result.error}")
    total = plan_for(job, len(examples)).total_steps
    with result.checkpoint.as_directory() as d:
        step = read_step(Path(d))
        outcome = JobResult("stopped", step, total, job_dir, metrics=read_metrics(job_dir))
        if step >= total:
            publish(job, store, Path(d))
            outcome.status, outcome.model = "succeeded", job.output_name
    return outcome


def _validation_examples(job: TrainJob, store: ModelStore) -> list[Example]:
    if job.validation_file is None:
        return []
    tok = Tokenizer.from_dir(store.path(job.model))
    return load_dataset(job.validation_file, job.objective, tok, job.hyperparameters.max_seq_len)


def _claim_job_dir(job: TrainJob, job_dir: Path) -> None:
    """The job dir belongs to one job spec: resuming is only allowed with the same spec."""
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_file = job_dir / SPEC
    spec = job.model_dump(mode="json")
    if spec_file.is_file() and json.loads(spec_file.read_text()) != spec:
        raise JobError(
            f"output_dir: {job_dir} holds a different job's run; use another output_dir or remove it"
        )
    spec_file.write_text(json.dumps(spec, indent=2))


def publish(job: TrainJob, store: ModelStore, checkpoint_dir: Path) -> None:
    base_dir = store.path(job.model)
    trainable = read_trainable(checkpoint_dir)
    source = f"train:{job.objective}:{job.method}:{job.job_dir()}"

    def copy_tokenizer(dst: Path) -> None:
        for name in _COPIED:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, dst / name)

    if job.method == "lora":

        def build_adapter(dst: Path) -> None:
            save_adapter(dst, _peft_names(trainable), job.lora, job.model)
            copy_tokenizer(dst)

        store.create_adapter(job.output_name, job.model, source, build_adapter)
        return

    def build_full(dst: Path) -> None:
        cfg = read_config(base_dir)
        tensors = {}
        for name, (file, target) in plan_checkpoint(base_dir, cfg).items():
            value = trainable.get(target.param)
            if value is None:  # not trained (e.g. a router bias): the base's tensor as it was
                with safe_open(str(file), "pt") as f:
                    tensors[name] = f.get_tensor(name)
                continue
            tensors[name] = (value if target.expert is None else value[target.expert]).contiguous().clone()
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((base_dir / "config.json").read_text())
        config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(dst)

    store.create(job.output_name, source, build_full)


def _peft_names(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's live names (…q_proj.lora_A.default.weight) → its saved names (base_model.model.…lora_A.weight)."""
    return {"base_model.model." + k.replace(".default.", "."): v for k, v in trainable.items()}
