"""The controller's durable state: files, jobs, their events and checkpoints, in SQLite or Redis.

    store = open_job_store("sqlite:///var/tandem/controller.db")   # the default: an embedded file
    store = open_job_store("redis://:password@redis:6379/0")        # shared, for a replicated setup

Both keep every record as JSON and answer the same small API; a controller that restarts on the
same store finds every file and job as it left them. Events carry a per-job sequence number so a
watcher can resume after the last one it saw.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlparse

from services.controller.records import Checkpoint, Job, JobEvent, TrainingFile, new_id, now


class JobStore:
    """The API both backends implement (records as JSON under an id)."""

    def save_job(self, job: Job) -> None: ...
    def get_job(self, job_id: str) -> Job | None: ...
    def list_jobs(self) -> list[Job]: ...  # newest first
    def save_file(self, f: TrainingFile) -> None: ...
    def get_file(self, file_id: str) -> TrainingFile | None: ...
    def list_files(self) -> list[TrainingFile]: ...
    def delete_file(self, file_id: str) -> bool: ...
    def _append_event(self, event: JobEvent) -> None: ...
    def _next_seq(self, job_id: str) -> int: ...
    def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]: ...
    def add_checkpoint(self, cp: Checkpoint) -> None: ...
    def checkpoints(self, job_id: str) -> list[Checkpoint]: ...
    def close(self) -> None: ...

    def add_event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> JobEvent:
        event = JobEvent(
            new_id("ftevent"), job_id, self._next_seq(job_id), now(), level, type, message, data or {}
        )
        self._append_event(event)
        return event


class SqliteJobStore(JobStore):
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at INTEGER, body TEXT);
            CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, created_at INTEGER, body TEXT);
            CREATE TABLE IF NOT EXISTS events (job_id TEXT, seq INTEGER, body TEXT, PRIMARY KEY (job_id, seq));
            CREATE TABLE IF NOT EXISTS checkpoints (job_id TEXT, step INTEGER, body TEXT,
                                                    PRIMARY KEY (job_id, step));
            """
        )

    def _rows(self, sql: str, *args) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(sql, args).fetchall()]

    def _run(self, sql: str, *args) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def save_job(self, job: Job) -> None:
        self._run(
            "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?)", job.id, job.created_at, json.dumps(job.to_dict())
        )

    def get_job(self, job_id: str) -> Job | None:
        rows = self._rows("SELECT body FROM jobs WHERE id = ?", job_id)
        return Job.from_dict(json.loads(rows[0])) if rows else None

    def list_jobs(self) -> list[Job]:
        rows = self._rows("SELECT body FROM jobs ORDER BY created_at DESC, rowid DESC")
        return [Job.from_dict(json.loads(r)) for r in rows]

    def save_file(self, f: TrainingFile) -> None:
        self._run(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?)", f.id, f.created_at, json.dumps(f.to_dict())
        )

    def get_file(self, file_id: str) -> TrainingFile | None:
        rows = self._rows("SELECT body FROM files WHERE id = ?", file_id)
        return TrainingFile.from_dict(json.loads(rows[0])) if rows else None

    def list_files(self) -> list[TrainingFile]:
        rows = self._rows("SELECT body FROM files ORDER BY created_at DESC, rowid DESC")
        return [TrainingFile.from_dict(json.loads(r)) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        return self._run("DELETE FROM files WHERE id = ?", file_id) > 0

    def _next_seq(self, job_id: str) -> int:
        rows = self._rows("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", job_id)
        return int(rows[0]) + 1

    def _append_event(self, event: JobEvent) -> None:
        self._run("INSERT INTO events VALUES (?, ?, ?)", event.job_id, event.seq, json.dumps(event.to_dict()))

    def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        rows = self._rows(
            "SELECT body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", job_id, after_seq
        )
        return [JobEvent.from_dict(json.loads(r)) for r in rows]

    def add_checkpoint(self, cp: Checkpoint) -> None:
        self._run(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
            cp.job_id,
            cp.step,
            json.dumps(cp.to_dict()),
        )

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        rows = self._rows("SELECT body FROM checkpoints WHERE job_id = ? ORDER BY step DESC", job_id)
        return [Checkpoint.from_dict(json.loads(r)) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisJobStore(JobStore):
    """Hashes of JSON records under `prefix`; events and checkpoints in a list per job."""

    def __init__(self, url: str, prefix: str = "tandem:controller:"):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=5)
        self.r.ping()
        self.p = prefix

    def _all(self, key: str) -> list[dict]:
        return [json.loads(v) for v in self.r.hvals(self.p + key)]

    def save_job(self, job: Job) -> None:
        self.r.hset(self.p + "jobs", job.id, json.dumps(job.to_dict()))

    def get_job(self, job_id: str) -> Job | None:
        raw = self.r.hget(self.p + "jobs", job_id)
        return Job.from_dict(json.loads(raw)) if raw else None

    def list_jobs(self) -> list[Job]:
        jobs = [Job.from_dict(d) for d in self._all("jobs")]
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)

    def save_file(self, f: TrainingFile) -> None:
        self.r.hset(self.p + "files", f.id, json.dumps(f.to_dict()))

    def get_file(self, file_id: str) -> TrainingFile | None:
        raw = self.r.hget(self.p + "files", file_id)
        return TrainingFile.from_dict(json.loads(raw)) if raw else None

    def list_files(self) -> list[TrainingFile]:
        files = [TrainingFile.from_dict(d) for d in self._all("files")]
        return sorted(files, key=lambda f: f.created_at, reverse=True)

    def delete_file(self, file_id: str) -> bool:
        return self.r.hdel(self.p + "files", file_id) > 0

    def _next_seq(self, job_id: str) -> int:
        return int(self.r.incr(f"{self.p}seq:{job_id}"))

    def _append_event(self, event: JobEvent) -> None:
        self.r.rpush(f"{self.p}events:{event.job_id}", json.dumps(event.to_dict()))

    def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        rows = [JobEvent.from_dict(json.loads(v)) for v in self.r.lrange(f"{self.p}events:{job_id}", 0, -1)]
        return [e for e in rows if e.seq > after_seq]

    def add_checkpoint(self, cp: Checkpoint) -> None:
        self.r.hset(f"{self.p}checkpoints:{cp.job_id}", str(cp.step), json.dumps(cp.to_dict()))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        rows = [Checkpoint.from_dict(d) for d in self._all(f"checkpoints:{job_id}")]
        return sorted(rows, key=lambda c: c.step, reverse=True)

    def close(self) -> None:
        self.r.close()


def open_job_store(url: str) -> JobStore:
    """sqlite:///ABSOLUTE/PATH (or a bare path) or redis://…"""
    parsed = urlparse(url)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisJobStore(url)
    if parsed.scheme in ("sqlite", ""):
        return SqliteJobStore(Path(parsed.path if parsed.scheme else url))
    raise ValueError(f"job store must be sqlite:///PATH or redis://HOST:PORT, got '{url}'")
