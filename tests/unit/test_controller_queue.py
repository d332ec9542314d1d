"""The controller's job store (SQLite and a real Redis, same API, durable across reopening) and its
queue: admission by (priority, arrival) within CPU/GPU capacity, strictly in order, with fake executors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.controller.controller import Capacity, Controller
from services.controller.executors import RunStatus
from services.controller.job_store import RedisJobStore, SqliteJobStore, open_job_store
from services.controller.records import Checkpoint, Job, JobSpec, TrainingFile
from shared.store import ModelStore


@pytest.fixture(params=["sqlite", "redis"])
def job_store(request, tmp_path):
    if request.param == "sqlite":
        yield open_job_store(f"sqlite://{tmp_path / 'jobs.db'}")
    else:
        url = request.getfixturevalue("redis_url")
        store = RedisJobStore(url, prefix=f"test:{tmp_path.name}:")
        yield store
        store.close()


def job(
    job_id: str, created: int, priority: int = 0, cpus: int = 1, gpus: int = 0, status: str = "queued"
) -> Job:
    spec = JobSpec(
        model="m", training_file="file-1", num_workers=cpus, gpus_per_worker=gpus // cpus, priority=priority
    )
    return Job(job_id, spec, status, created, executor="fake")


def test_records_round_trip_and_events_are_numbered_per_job(job_store):
    j = job("ftjob-a", 10)
    j.spec.seed, j.valid_loss = 7, 0.5
    job_store.save_job(j)
    job_store.save_job(job("ftjob-b", 20))
    assert job_store.get_job("ftjob-a") == j and job_store.get_job("nope") is None
    assert [x.id for x in job_store.list_jobs()] == ["ftjob-b", "ftjob-a"]  # newest first
    f = TrainingFile("file-1", "a.jsonl", "fine-tune", 12, 5, "sft", 3, "/x")
    job_store.save_file(f)
    assert job_store.get_file("file-1") == f and job_store.list_files() == [f]
    assert job_store.delete_file("file-1") and not job_store.delete_file("file-1")
    for i in range(3):
        job_store.add_event("ftjob-a", f"e{i}", data={"i": i})
    job_store.add_event("ftjob-b", "other")
    assert [(e.seq, e.message) for e in job_store.events("ftjob-a")] == [(1, "e0"), (2, "e1"), (3, "e2")]
    assert [e.data for e in job_store.events("ftjob-a", after_seq=2)] == [{"i": 2}]
    job_store.add_checkpoint(Checkpoint("ftckpt-1", "ftjob-a", 5, 1, "/c5", {"step": 5}))
    job_store.add_checkpoint(Checkpoint("ftckpt-2", "ftjob-a", 10, 2, "/c10"))
    assert [c.step for c in job_store.checkpoints("ftjob-a")] == [10, 5]


def test_sqlite_state_survives_reopening(tmp_path):
    first = SqliteJobStore(tmp_path / "c.db")
    first.save_job(job("ftjob-a", 1, status="running"))
    first.add_event("ftjob-a", "started")
    first.close()
    again = SqliteJobStore(tmp_path / "c.db")
    assert again.get_job("ftjob-a").status == "running"
    assert again.add_event("ftjob-a", "more").seq == 2


class FakeExecutor:
    name = "fake"

    def __init__(self):
        self.launched: list[str] = []
        self.states: dict[str, str] = {}

    def launch(self, j: Job) -> str:
        self.launched.append(j.id)
        return f"run-{j.id}"

    def poll(self, j: Job) -> RunStatus:
        return RunStatus(self.states.get(j.id, "running"), "boom")

    def cancel(self, j: Job) -> None:
        self.states[j.id] = "cancelled"


def controller(tmp_path: Path, capacity: Capacity) -> tuple[Controller, FakeExecutor]:
    fake = FakeExecutor()
    c = Controller(SqliteJobStore(tmp_path / "c.db"), ModelStore(tmp_path / "models"), tmp_path,
                   {"fake": fake}, "fake", capacity)  # fmt: skip
    return c, fake


def test_admission_follows_priority_then_arrival_and_never_skips_the_head(tmp_path):
    c, fake = controller(tmp_path, Capacity(cpus=2, gpus=2))
    for j in (
        job("late-urgent", 5, priority=-1),
        job("first", 1),
        job("big", 2, cpus=2, gpus=2),
        job("small", 3),
    ):
        c.store.save_job(j)

    async def run():
        await c.step()
        assert fake.launched == ["late-urgent", "first"]  # priority first, then arrival
        await c.step()
        assert fake.launched == ["late-urgent", "first"]  # "big" waits for 2 CPUs; "small" may not pass it
        fake.states["first"] = "failed"
        await c.step()
        assert fake.launched == ["late-urgent", "first"]  # one CPU free is still not enough for "big"
        await c.cancel_job("late-urgent")
        await c.step()
        assert fake.launched == ["late-urgent", "first", "big"]
        assert c.get_job("first").status == "failed" and c.get_job("first").error == "boom"
        assert c.get_job("late-urgent").status == "cancelled" and fake.states["late-urgent"] == "cancelled"
        assert c.get_job("small").status == "queued"

    asyncio.run(run())


def test_ids_sort_by_creation_so_jobs_of_the_same_second_keep_their_order():
    from services.controller.records import new_id

    ids = [new_id("ftjob") for _ in range(200)]  # within one second: created_at ties, the id decides
    assert ids == sorted(ids) and len(set(ids)) == 200
