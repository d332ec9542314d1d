"""The controller's gRPC servicer: proto ⇄ the controller's records, errors → status codes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc

from services.controller.controller import Capacity, Controller, ControllerError
from services.controller.records import STATES, Checkpoint, Job, JobEvent, JobSpec, TrainingFile
from shared.rpc.server import GrpcServer
from shared.telemetry.metrics import Snapshot, family
from tandem.v1 import controller_pb2 as pb
from tandem.v1 import controller_pb2_grpc

log = logging.getLogger("tandem.controller")
SERVICE_NAME = "tandem.v1.Controller"
STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
}
_OPTIONAL = ("seed", "n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "beta", "max_steps",
             "max_seq_len")  # fmt: skip


def spec_from_proto(m: pb.JobSpec) -> JobSpec:
    plain = {f: getattr(m, f) for f in ("model", "training_file", "validation_file", "objective", "suffix",
                                        "full", "lora_r", "lora_alpha", "priority", "executor",
                                        "gpus_per_worker")}  # fmt: skip
    optional = {f: getattr(m, f) for f in _OPTIONAL if m.HasField(f)}
    return JobSpec(**plain, **optional, num_workers=m.num_workers or 1)


def spec_to_proto(s: JobSpec) -> pb.JobSpec:
    fields = {k: v for k, v in s.to_dict().items() if v is not None}
    return pb.JobSpec(**fields)


def job_to_proto(j: Job) -> pb.Job:
    fields = {
        k: v
        for k, v in j.to_dict().items()
        if k in pb.Job.DESCRIPTOR.fields_by_name and k != "spec" and v is not None
    }
    return pb.Job(spec=spec_to_proto(j.spec), **fields)


def file_to_proto(f: TrainingFile) -> pb.TrainingFile:
    return pb.TrainingFile(**{k: v for k, v in f.to_dict().items() if k != "path"})


def event_to_proto(e: JobEvent) -> pb.JobEvent:
    d = e.to_dict()
    data = d.pop("data")
    return pb.JobEvent(data_json=json.dumps(data) if data else "", **d)


def checkpoint_to_proto(c: Checkpoint) -> pb.Checkpoint:
    d = c.to_dict()
    return pb.Checkpoint(metrics_json=json.dumps(d.pop("metrics")), **d)


class ControllerService(controller_pb2_grpc.ControllerServicer):
    def __init__(self, controller: Controller):
        self.c = controller

    async def _call(self, context, fn, *args):
        try:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        except ControllerError as e:
            await context.abort(STATUS.get(e.kind, grpc.StatusCode.INVALID_ARGUMENT), str(e))

    async def UploadFile(self, request, context):
        f = await self._call(context, self.c.upload_file, request.filename, request.purpose, request.content)
        return file_to_proto(f)

    async def GetFile(self, request, context):
        return file_to_proto(await self._call(context, self.c.get_file, request.id))

    async def ListFiles(self, request, context):
        files = [f for f in self.c.store.list_files() if not request.purpose or f.purpose == request.purpose]
        return pb.ListFilesResponse(files=[file_to_proto(f) for f in files])

    async def DeleteFile(self, request, context):
        await self._call(context, self.c.delete_file, request.id)
        return pb.DeleteFileResponse(id=request.id, deleted=True)

    async def CreateJob(self, request, context):
        return job_to_proto(await self._call(context, self.c.create_job, spec_from_proto(request.spec)))

    async def GetJob(self, request, context):
        return job_to_proto(await self._call(context, self.c.get_job, request.id))

    async def ListJobs(self, request, context):
        jobs = self.c.list_jobs(request.status)
        if request.after:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(request.after) + 1 :] if request.after in ids else []
        limit = request.limit or 100
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs[:limit]], has_more=len(jobs) > limit)

    async def CancelJob(self, request, context):
        return job_to_proto(await self._call(context, self.c.cancel_job, request.id))

    async def ListEvents(self, request, context):
        await self._call(context, self.c.get_job, request.id)
        events = self.c.store.events(request.id)
        if request.limit:
            events = events[-request.limit :]
        return pb.ListEventsResponse(events=[event_to_proto(e) for e in events])

    async def WatchJob(self, request, context):
        await self._call(context, self.c.get_job, request.id)
        async for event in self.c.watch(request.id, request.after_seq):
            yield event_to_proto(event)

    async def ListCheckpoints(self, request, context):
        await self._call(context, self.c.get_job, request.id)
        return pb.ListCheckpointsResponse(
            checkpoints=[checkpoint_to_proto(c) for c in self.c.store.checkpoints(request.id)]
        )

    async def DeleteModel(self, request, context):
        await self._call(context, self.c.delete_model, request.model)
        return pb.DeleteModelResponse(model=request.model, deleted=True)


def training_metrics(controller: Controller, recent: int = 10):
    """Jobs by state, and per job (the running ones and the `recent` newest others) its step, loss and
    throughput, at scrape time."""
    jobs = controller.list_jobs()  # newest first
    by_state = family("gauge", "training_jobs", "Training jobs, by state.", ["state"])
    for state in STATES:
        by_state.add_metric([state], sum(j.status == state for j in jobs))
    shown = [j for j in jobs if j.status == "running"] + [j for j in jobs if j.status != "running"][:recent]
    labels = ["job_id", "model"]
    per_job = {
        "training_loss": ("gauge", "Training loss at the job's last step."),
        "training_step": ("gauge", "The job's last finished step."),
        "training_total_steps": ("gauge", "Steps the job runs in all."),
        "training_trained_tokens": ("counter", "Tokens the job trained on so far."),
        "training_tokens_per_second": ("gauge", "Trained tokens per second of the job's run time."),
    }
    families = {k: family(kind, k, doc, labels) for k, (kind, doc) in per_job.items()}
    clock = time.time()
    for j in shown:
        if not j.started_at:
            continue
        key = [j.id, j.spec.model]
        elapsed = max(1e-9, (j.finished_at or clock) - j.started_at)
        for k, value in (("training_loss", j.loss), ("training_step", j.step), ("training_total_steps", j.total_steps),
                         ("training_trained_tokens", j.trained_tokens),
                         ("training_tokens_per_second", j.trained_tokens / elapsed)):  # fmt: skip
            families[k].add_metric(key, value)
    return [by_state, *families.values()]


async def start_server(
    controller: Controller,
    host: str = "127.0.0.1",
    port: int = 0,
    interval: float = 0.5,
    metrics_port: int | None = 0,
):
    """The controller's gRPC server plus its loop (stopped when the server drains)."""
    server = GrpcServer("controller", host, port, metrics_port=metrics_port)
    server.registry.register(Snapshot(lambda: training_metrics(controller)))
    server.add(
        controller_pb2_grpc.add_ControllerServicer_to_server, ControllerService(controller), SERVICE_NAME
    )
    await server.start()
    loop_task = asyncio.create_task(controller.run(interval))
    server.on_drain_start.append(loop_task.cancel)
    return server


def build_controller(
    home: Path,
    models_root: Path,
    store_url: str | None = None,
    executor: str = "ray",
    ray_address: str | None = None,
    capacity: Capacity = Capacity(1),
    threads_per_worker: int = 1,
    kubernetes: dict | None = None,
) -> Controller:
    """A Controller from plain config: the job store (SQLite in `home` unless a URL is given), the model
    store, and the executors (ray always; kubernetes when `kubernetes` options are given)."""
    from services.controller.executors import KubernetesExecutor, RayExecutor
    from services.controller.job_store import open_job_store
    from shared.store import ModelStore

    home = Path(home)
    store = open_job_store(store_url or f"sqlite://{(home / 'controller.db').resolve()}")
    executors = {"ray": RayExecutor(ray_address)}
    if kubernetes is not None:
        executors["kubernetes"] = KubernetesExecutor(**kubernetes)
    return Controller(store, ModelStore(models_root), home, executors, executor, capacity, threads_per_worker)
