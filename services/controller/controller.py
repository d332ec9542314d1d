"""The controller: training files and fine-tuning jobs, from upload to a servable `ft:` model.

    upload_file → create_job (validated against the base model's tokenizer: bad input fails here)
    → queued → admitted when its CPUs and GPUs are free (lower priority value first, then first
    come) → running on an executor → succeeded (the trainer published `ft:<base>:<suffix>:<job id>`
    to the model store) | failed (with the reason) | cancelled (in any state before the end; a
    running trainer is stopped and what it held is freed)

`step()` is one pass of the loop: follow each running job (new metrics lines become events, new
checkpoints are recorded, the executor says whether it ended), then admit what fits. Every change
is written to the job store first, so `recover()` after a restart finds running jobs (re-attached
through their executor handle), queued jobs (still queued) and every event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.controller.executors import SPEC_FILE, RunStatus
from services.controller.job_store import JobStore
from services.controller.records import Checkpoint, Job, JobSpec, TrainingFile, new_id, now
from shared.store import ModelStore, StoreError
from shared.train.config import JobError, parse_job
from shared.train.data import DatasetError, sniff_format

log = logging.getLogger("tandem.controller")

OBJECTIVES = ("sft", "dpo", "pretrain")  # also the training file's format each needs
BASE_LEARNING_RATE = {"lora": 2e-4, "full": 2e-5}  # × learning_rate_multiplier
SUFFIX = re.compile(r"^[A-Za-z0-9._-]{0,40}$")
MAX_FILE_BYTES = 48 * 2**20


class ControllerError(ValueError):
    """A request the controller refuses; `kind` picks the status (invalid | not_found | conflict)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Capacity:
    """What jobs may hold at once: CPUs (one per trainer worker) and GPUs."""

    cpus: int
    gpus: int = 0


class Controller:
    def __init__(
        self,
        store: JobStore,
        models: ModelStore,
        home: Path,
        executors: dict,
        default_executor: str = "ray",
        capacity: Capacity = Capacity(1),
        threads_per_worker: int = 1,
    ):
        if default_executor not in executors:
            raise ValueError(f"default executor '{default_executor}' is not configured ({sorted(executors)})")
        self.store, self.models, self.home = store, models, Path(home)
        self.executors, self.default_executor = executors, default_executor
        self.capacity, self.threads_per_worker = capacity, threads_per_worker
        self.changed = asyncio.Condition()
        self.cancelling: set[str] = set()  # jobs whose cancel is stopping the run: the loop leaves them be

    # -- files --------------------------------------------------------------------------------------

    def upload_file(self, filename: str, purpose: str, content: bytes) -> TrainingFile:
        if purpose != "fine-tune":
            raise ControllerError(f"purpose must be 'fine-tune', got '{purpose}'")
        if not content:
            raise ControllerError(f"{filename}: the file is empty")
        if len(content) > MAX_FILE_BYTES:
            raise ControllerError(f"{filename}: {len(content)} bytes is over the {MAX_FILE_BYTES} byte limit")
        file_id = new_id("file")
        path = self.home / "files" / f"{file_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        try:
            fmt, lines = sniff_format(path, filename or file_id)
        except DatasetError as e:
            path.unlink()
            raise ControllerError(str(e)) from e
        f = TrainingFile(file_id, filename, purpose, len(content), now(), fmt, lines, str(path))
        self.store.save_file(f)
        return f

    def get_file(self, file_id: str) -> TrainingFile:
        f = self.store.get_file(file_id)
        if f is None:
            raise ControllerError(f"No such File object: {file_id}", "not_found")
        return f

    def delete_file(self, file_id: str) -> None:
        f = self.get_file(file_id)
        users = [
            j.id
            for j in self.store.list_jobs()
            if not j.done and file_id in (j.spec.training_file, j.spec.validation_file)
        ]
        if users:
            raise ControllerError(f"file {file_id} is used by unfinished job {users[0]}", "conflict")
        self.store.delete_file(file_id)
        Path(f.path).unlink(missing_ok=True)

    # -- jobs ---------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise ControllerError(f"No such fine-tuning job: {job_id}", "not_found")
        return job

    async def create_job(self, spec: JobSpec) -> Job:
        """Validate everything a run needs (model, files, hyperparameters, resources, the whole
        dataset against the model's tokenizer), then queue it."""
        job = Job(
            new_id("ftjob"), spec, "validating_files", now(), executor=spec.executor or self.default_executor
        )
        self._check_request(spec)
        job.output_name = f"ft:{spec.model}:{spec.suffix}:{job.id}"
        job.job_dir = str(self.home / "jobs" / job.id)
        train_job = self._train_job(job)
        from shared.train.job import prepare

        try:
            await asyncio.to_thread(prepare, train_job)  # the validation file too
        except (JobError, DatasetError) as e:
            raise ControllerError(str(e).replace(str(self.home / "files") + "/", "")) from e
        Path(job.job_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.job_dir) / SPEC_FILE).write_text(yaml.safe_dump(train_job.model_dump(mode="json")))
        job.status = "queued"
        self.store.save_job(job)
        await self._event(job, f"Created fine-tuning job: {job.id}")
        await self._event(job, "Validating training file: " + spec.training_file)
        await self._event(job, "Files validated, moving job to queued state")
        return job

    def _check_request(self, spec: JobSpec) -> None:
        try:
            base = self.models.get(spec.model)
        except StoreError as e:
            raise ControllerError(f"model: {e}", "not_found") from e
        if base.base_model:
            raise ControllerError(
                f"model: '{spec.model}' is a LoRA adapter; fine-tune its base '{base.base_model}'"
            )
        if spec.objective not in OBJECTIVES:
            raise ControllerError(
                f"method.type: must be supervised, dpo or (tandem) pretrain, got '{spec.objective}'"
            )
        if not SUFFIX.match(spec.suffix):
            raise ControllerError("suffix: at most 40 letters, digits, '.', '_' or '-'")
        if spec.executor and spec.executor not in self.executors:
            raise ControllerError(
                f"tandem.executor: must be one of {sorted(self.executors)}, got '{spec.executor}'"
            )
        if spec.num_workers < 1:
            raise ControllerError("tandem.num_workers: must be at least 1")
        if spec.gpus > self.capacity.gpus:
            raise ControllerError(
                f"tandem.gpus_per_worker: the job asks for {spec.gpus} GPUs, the controller has {self.capacity.gpus}"
            )
        if spec.cpus > self.capacity.cpus:
            raise ControllerError(
                f"tandem.num_workers: the job asks for {spec.cpus} workers, the controller runs at most {self.capacity.cpus}"
            )
        for field, file_id in (
            ("training_file", spec.training_file),
            ("validation_file", spec.validation_file),
        ):
            if field == "validation_file" and not file_id:
                continue
            f = self.store.get_file(file_id)
            if f is None:
                raise ControllerError(f"{field}: no such file '{file_id}'")
            if f.format != spec.objective:
                raise ControllerError(
                    f"{field}: {f.filename} holds {f.format} examples, but the method is {spec.objective}"
                )

    def _train_job(self, job: Job):
        spec = job.spec
        method = "full" if spec.full else "lora"
        hp: dict = {}
        hp["learning_rate"] = spec.learning_rate or BASE_LEARNING_RATE[method] * (
            spec.learning_rate_multiplier or 1.0
        )
        if spec.batch_size is None:
            lines = self.get_file(spec.training_file).lines
            per_worker = max(1, min(8, lines) // spec.num_workers)
            hp["batch_size"] = per_worker * spec.num_workers
        else:
            hp["batch_size"] = spec.batch_size
        hp["micro_batch_size"] = max(1, min(4, hp["batch_size"] // spec.num_workers))
        for ours, theirs in (("n_epochs", "epochs"), ("max_steps", "max_steps"), ("max_seq_len", "max_seq_len"),
                             ("seed", "seed")):  # fmt: skip
            if getattr(spec, ours) is not None:
                hp[theirs] = getattr(spec, ours)
        raw = {
            "model": spec.model,
            "objective": spec.objective,
            "method": method,
            "training_file": self.get_file(spec.training_file).path,
            "validation_file": self.get_file(spec.validation_file).path if spec.validation_file else None,
            "output_name": job.output_name,
            "model_store": str(self.models.root.resolve()),
            "output_dir": job.job_dir,
            "hyperparameters": hp,
            "scaling": {
                "num_workers": spec.num_workers,
                "use_gpu": spec.gpus_per_worker > 0,
                "threads_per_worker": self.threads_per_worker,
            },
            "checkpoint": {"every_steps": 10, "keep": 3},
        }
        if spec.lora_r or spec.lora_alpha:
            r = spec.lora_r or 8
            raw["lora"] = {"r": r, "alpha": spec.lora_alpha or 2.0 * r}
        if spec.beta is not None:
            raw["dpo"] = {"beta": spec.beta}
        try:
            return parse_job(raw)
        except JobError as e:
            raise ControllerError(_openai_field(str(e))) from e

    async def cancel_job(self, job_id: str) -> Job:
        job = self.get_job(job_id)
        if job.done:
            raise ControllerError(
                f"job {job_id} has already {job.status}; only unfinished jobs can be cancelled", "conflict"
            )
        self.cancelling.add(job_id)
        try:
            if job.status == "running":
                await asyncio.to_thread(self.executors[job.executor].cancel, job)
            await self._finish(job, "cancelled", "The job was cancelled")
        finally:
            self.cancelling.discard(job_id)
        return job

    def delete_model(self, name: str) -> None:
        """Remove a fine-tune this controller's jobs produced from the model store."""
        if not any(j.fine_tuned_model == name for j in self.list_jobs("succeeded")):
            raise ControllerError(
                f"The model '{name}' is not a fine-tuned model of this platform", "not_found"
            )
        if self.models.has(name):
            self.models.remove(name)

    def list_jobs(self, status: str = "") -> list[Job]:
        return [j for j in self.store.list_jobs() if not status or j.status == status]

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self, interval: float = 0.5) -> None:
        await self.recover()
        while True:
            try:
                await self.step()
            except Exception:  # one bad pass must not stop the controller
                log.exception("controller step failed")
            await asyncio.sleep(interval)

    async def recover(self) -> None:
        for job in self.list_jobs("running"):
            if job.executor not in self.executors:
                await self._finish(
                    job, "failed", f"its executor '{job.executor}' is not configured any more", "error"
                )
                continue
            await self._event(job, f"Controller restarted; re-attached to run {job.handle}")

    async def step(self) -> None:
        for job in self.list_jobs("running"):
            await self._follow(job)
        await self._admit()

    async def _admit(self) -> None:
        jobs = self.store.list_jobs()  # one read of the store for both states
        running = [j for j in jobs if j.status == "running"]
        cpus = sum(j.spec.cpus for j in running)
        gpus = sum(j.spec.gpus for j in running)
        queued = sorted(
            (j for j in jobs if j.status == "queued"), key=lambda j: (j.spec.priority, j.created_at, j.id)
        )
        for job in queued:  # strictly in order: a big job at the head is not starved by small ones
            if cpus + job.spec.cpus > self.capacity.cpus or gpus + job.spec.gpus > self.capacity.gpus:
                return
            await self._start(job)
            cpus, gpus = cpus + job.spec.cpus, gpus + job.spec.gpus

    async def _start(self, job: Job) -> None:
        executor = self.executors[job.executor]
        try:
            job.handle = await asyncio.to_thread(executor.launch, job)
        except Exception as e:
            await self._finish(
                job, "failed", f"the {executor.name} executor could not start the job: {e}", "error"
            )
            return
        job.status, job.started_at = "running", now()
        self.store.save_job(job)
        await self._event(job, f"Fine-tuning job started ({executor.name}: {job.handle})")

    async def _follow(self, job: Job) -> None:
        if job.id in self.cancelling:
            return
        await self._read_metrics(job)
        self._record_checkpoints(job)
        status: RunStatus = await asyncio.to_thread(self.executors[job.executor].poll, job)
        if (
            job.id in self.cancelling or self.get_job(job.id).done
        ):  # cancelled meanwhile: the run's end is that
            return
        if status.state == "running":
            self.store.save_job(job)
            return
        await self._read_metrics(job)
        self._record_checkpoints(job)
        if status.state == "succeeded" and self.models.has(job.output_name):
            job.fine_tuned_model = job.output_name
            await self._event(job, f"New fine-tuned model created: {job.output_name}")
            await self._finish(job, "succeeded", "The job has successfully completed")
        else:
            await self._finish(job, "failed", status.reason or "the trainer did not publish a model", "error")

    async def _read_metrics(self, job: Job) -> None:
        path = Path(job.job_dir) / "metrics.jsonl"
        try:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        except OSError:
            return
        for line in lines[job.metrics_read :]:
            m = json.loads(line)
            job.step, job.total_steps, job.loss = m["step"], m["total_steps"], m["loss"]
            job.trained_tokens += int(m.get("tokens", 0))
            elapsed = max(0, now() - job.started_at)
            job.estimated_finish = now() + int(elapsed / max(job.step, 1) * (job.total_steps - job.step))
            data = {
                k: m[k] for k in ("step", "total_steps", "learning_rate", "grad_norm", "tokens") if k in m
            }
            data["train_loss"] = m["loss"]
            message = f"Step {job.step}/{job.total_steps}: training loss={job.loss:.4f}"
            if "valid_loss" in m:  # after the last step, over the whole validation file
                data["full_valid_loss"] = job.valid_loss = m["valid_loss"]
                message += f", full validation loss={job.valid_loss:.4f}"
            await self._event(job, message, type="metrics", data=data)
        job.metrics_read = len(lines)

    def _record_checkpoints(self, job: Job) -> None:
        from shared.train.trainer import read_step

        known = {c.step for c in self.store.checkpoints(job.id)}
        for d in sorted((Path(job.job_dir) / "run").glob("checkpoint_*")):
            try:
                step = read_step(d)
            except (OSError, ValueError, KeyError):
                continue  # still being written
            if step not in known:
                metrics = {"step": step}
                if step == job.step:
                    metrics["train_loss"] = job.loss
                    if job.valid_loss is not None:
                        metrics["full_valid_loss"] = job.valid_loss
                self.store.add_checkpoint(Checkpoint(new_id("ftckpt"), job.id, step, now(), str(d), metrics))

    async def _finish(self, job: Job, status: str, message: str, level: str = "info") -> None:
        job.status, job.finished_at = status, now()
        if status == "failed":
            job.error = message
        self.store.save_job(job)
        await self._event(job, message if status != "failed" else f"Fine-tuning job failed: {message}", level)

    async def _event(
        self, job: Job, message: str, level: str = "info", type: str = "message", data=None
    ) -> None:
        self.store.add_event(job.id, message, level, type, data)
        async with self.changed:
            self.changed.notify_all()

    async def watch(self, job_id: str, after_seq: int = 0):
        """Events after `after_seq`, then live ones until the job ends."""
        self.get_job(job_id)
        while True:
            for event in self.store.events(job_id, after_seq):
                after_seq = event.seq
                yield event
            if self.get_job(job_id).done and not self.store.events(job_id, after_seq):
                return
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=1.0)
                except TimeoutError:
                    pass


def _openai_field(message: str) -> str:
    """Trainer field names → the API's (hyperparameters.epochs → n_epochs, ...)."""
    for ours, theirs in (("hyperparameters.epochs", "n_epochs"), ("hyperparameters.batch_size", "batch_size"),
                         ("hyperparameters.learning_rate", "learning_rate_multiplier"), ("dpo.beta", "beta")):  # fmt: skip
        message = message.replace(ours, theirs)
    return message
