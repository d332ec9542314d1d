"""What the controller keeps: training files, jobs with their spec, the events of a job, checkpoints.

Plain dataclasses that round-trip through JSON (`to_dict` / `from_dict`), which is how the job store
keeps them; the gRPC server converts them to and from protos in one place (server.py).

Job states, OpenAI's names:

    validating_files → queued → running → succeeded | failed
                          └────────┴─────→ cancelled
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from dataclasses import dataclass, field

TERMINAL = ("succeeded", "failed", "cancelled")
STATES = ("validating_files", "queued", "running", *TERMINAL)


_last_stamp = [0]
_stamp_lock = threading.Lock()


def new_id(prefix: str) -> str:
    """A unique id that sorts by creation time (microseconds, strictly increasing within the process,
    then random): the queue's FIFO order among jobs created within the same second (created_at has
    whole seconds, as in OpenAI's API)."""
    with _stamp_lock:  # two ids in one microsecond must not be ordered by their random part
        stamp = _last_stamp[0] = max(time.time_ns() // 1000, _last_stamp[0] + 1)
    return f"{prefix}-{stamp:013x}{secrets.token_hex(6)}"


def now() -> int:
    return int(time.time())


class _Record:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainingFile(_Record):
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    format: str  # sft | dpo | pretrain
    lines: int
    path: str  # where the controller keeps the content


@dataclass
class JobSpec(_Record):
    """A fine-tuning job as asked for: OpenAI's fields, then Tandem's (see controller.proto)."""

    model: str
    training_file: str
    validation_file: str = ""
    objective: str = "sft"  # sft | dpo | pretrain
    suffix: str = ""
    seed: int | None = None
    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    learning_rate: float | None = None
    beta: float | None = None
    max_steps: int | None = None
    max_seq_len: int | None = None
    full: bool = False
    lora_r: int = 0
    lora_alpha: float = 0.0
    num_workers: int = 1
    gpus_per_worker: int = 0
    priority: int = 0
    executor: str = ""

    @property
    def cpus(self) -> int:
        return self.num_workers

    @property
    def gpus(self) -> int:
        return self.num_workers * self.gpus_per_worker


@dataclass
class Job(_Record):
    id: str
    spec: JobSpec
    status: str
    created_at: int
    started_at: int = 0
    finished_at: int = 0
    fine_tuned_model: str = ""
    error: str = ""
    trained_tokens: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    valid_loss: float | None = None  # over the validation file, after the last step
    executor: str = ""
    handle: str = ""  # the executor's name for the run
    estimated_finish: int = 0  # unix seconds, estimated at the last step (0: unknown)
    output_name: str = ""  # the model store name the run publishes (ft:<base>:<suffix>:<id>)
    job_dir: str = ""  # spec, logs, metrics and checkpoints of the run
    metrics_read: int = 0  # metrics lines already turned into events

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        job = super().from_dict(d)
        job.spec = JobSpec.from_dict(d["spec"])
        return job


@dataclass
class JobEvent(_Record):
    id: str
    job_id: str
    seq: int
    created_at: int
    level: str  # info | warn | error
    type: str  # message | metrics
    message: str
    data: dict = field(default_factory=dict)


@dataclass
class Checkpoint(_Record):
    id: str
    job_id: str
    step: int
    created_at: int
    path: str
    metrics: dict = field(default_factory=dict)
