"""OpenAI's files and fine-tuning REST API on the gateway, backed by the controller service.

    POST /v1/files (multipart: file, purpose=fine-tune)   GET /v1/files   GET|DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs   GET /v1/fine_tuning/jobs[?after=&limit=]   GET /v1/fine_tuning/jobs/{id}
    GET /v1/fine_tuning/jobs/{id}/events   POST /v1/fine_tuning/jobs/{id}/cancel
    GET /v1/fine_tuning/jobs/{id}/checkpoints

Bodies and objects have OpenAI's shapes, so the official SDKs drive them unchanged. Tandem's own
options ride in one extra object, `tandem` (the SDKs' `extra_body={"tandem": {...}}`):

    {"objective": "pretrain", "method": "lora"|"full", "lora": {"r": 8, "alpha": 16},
     "num_workers": 1, "gpus_per_worker": 0, "priority": 0, "executor": "ray"|"kubernetes",
     "learning_rate": 2e-4, "max_steps": 20, "max_seq_len": 1024}

Controller errors come back as OpenAI errors: INVALID_ARGUMENT → 400 (param: the field it names),
NOT_FOUND → 404, FAILED_PRECONDITION (e.g. cancelling a finished job) → 409.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import grpc
from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.protocol import OpenAIError
from shared.rpc.security import channel
from tandem.v1 import controller_pb2 as pb
from tandem.v1 import controller_pb2_grpc

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
METHOD_TYPES = {"supervised": "sft", "dpo": "dpo"}
TYPE_OF = {"sft": "supervised", "dpo": "dpo", "pretrain": "supervised"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Body):
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    beta: float | Literal["auto"] = "auto"


class _MethodPart(_Body):
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(_Body):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: _MethodPart | None = None
    dpo: _MethodPart | None = None


class LoraOptions(_Body):
    r: int = Field(8, gt=0)
    alpha: float | None = Field(None, gt=0)


class TandemOptions(_Body):
    objective: Literal["pretrain"] | None = None
    method: Literal["lora", "full"] = "lora"
    lora: LoraOptions | None = None
    num_workers: int = Field(1, ge=1)
    gpus_per_worker: int = Field(0, ge=0)
    priority: int = 0
    executor: str = ""
    learning_rate: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_seq_len: int | None = Field(None, gt=1)


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="ignore")  # metadata, integrations: accepted, not used

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None  # the legacy top-level form
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = None
    tandem: TandemOptions = TandemOptions()

    def spec(self) -> pb.JobSpec:
        method = self.method or Method()
        part = getattr(method, method.type) or _MethodPart()
        hp = self.hyperparameters or part.hyperparameters
        t = self.tandem
        spec = pb.JobSpec(
            model=self.model, training_file=self.training_file, validation_file=self.validation_file or "",
            objective=t.objective or METHOD_TYPES[method.type], suffix=self.suffix or "",
            full=t.method == "full", num_workers=t.num_workers, gpus_per_worker=t.gpus_per_worker,
            priority=t.priority, executor=t.executor,
        )  # fmt: skip
        if t.objective and method.type != "supervised":
            raise OpenAIError(400, "tandem.objective pretrain goes with method.type supervised", "tandem")
        if t.lora is not None:
            spec.lora_r, spec.lora_alpha = t.lora.r, t.lora.alpha or 2.0 * t.lora.r
        for name, value in (("seed", self.seed), ("n_epochs", hp.n_epochs), ("batch_size", hp.batch_size),
                            ("learning_rate_multiplier", hp.learning_rate_multiplier), ("beta", hp.beta),
                            ("learning_rate", t.learning_rate), ("max_steps", t.max_steps),
                            ("max_seq_len", t.max_seq_len)):  # fmt: skip
            if value is not None and value != "auto":
                setattr(spec, name, value)
        if spec.HasField("beta") and spec.objective != "dpo":
            raise OpenAIError(400, "beta is a dpo hyperparameter", "beta")
        return spec


# -- objects in OpenAI's shapes --------------------------------------------------------------------


def file_json(f: pb.TrainingFile) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None}  # fmt: skip


def job_json(j: pb.Job) -> dict:
    s = j.spec
    hp = {
        "n_epochs": s.n_epochs if s.HasField("n_epochs") else "auto",
        "batch_size": s.batch_size if s.HasField("batch_size") else "auto",
        "learning_rate_multiplier": s.learning_rate_multiplier
        if s.HasField("learning_rate_multiplier")
        else "auto",
    }
    mtype = TYPE_OF[s.objective]
    method_hp = {**hp, **({"beta": s.beta if s.HasField("beta") else "auto"} if mtype == "dpo" else {})}
    eta = j.estimated_finish if j.status == "running" and j.estimated_finish else None
    return {
        "object": "fine_tuning.job", "id": j.id, "model": s.model, "created_at": j.created_at,
        "finished_at": j.finished_at or None, "fine_tuned_model": j.fine_tuned_model or None,
        "organization_id": "org-tandem", "result_files": [], "status": j.status,
        "validation_file": s.validation_file or None, "training_file": s.training_file,
        "hyperparameters": hp, "trained_tokens": j.trained_tokens if j.status == "succeeded" else None,
        "error": {"code": "training_failed", "message": j.error, "param": None} if j.error else None,
        "seed": s.seed if s.HasField("seed") else 0, "estimated_finish": eta, "integrations": [],
        "user_provided_suffix": s.suffix or None, "metadata": None,
        "method": {"type": mtype, mtype: {"hyperparameters": method_hp}},
        "tandem": {"objective": s.objective, "method": "full" if s.full else "lora", "num_workers": s.num_workers,
                   "gpus_per_worker": s.gpus_per_worker, "priority": s.priority, "executor": j.executor,
                   "step": j.step, "total_steps": j.total_steps, "loss": j.loss if j.step else None,
                   "valid_loss": j.valid_loss if j.HasField("valid_loss") else None},
    }  # fmt: skip


def event_json(e: pb.JobEvent) -> dict:
    return {"object": "fine_tuning.job.event", "id": e.id, "created_at": e.created_at, "level": e.level,
            "message": e.message, "type": e.type, "data": json.loads(e.data_json) if e.data_json else {}}  # fmt: skip


def checkpoint_json(c: pb.Checkpoint, model: str) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": c.id, "created_at": c.created_at,
            "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{c.step}", "step_number": c.step,
            "metrics": json.loads(c.metrics_json or "{}"), "fine_tuning_job_id": c.job_id}  # fmt: skip


def page(items: list, after: str | None, limit: int) -> dict:
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


class ControllerClient:
    def __init__(self, address: str, timeout: float = 60.0):
        self.channel = channel(address)
        self.stub = controller_pb2_grpc.ControllerStub(self.channel)
        self.timeout = timeout

    async def call(self, method: str, request):
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            status = HTTP_STATUS.get(e.code(), 500)
            message = e.details() or e.code().name
            first = message.split(":", 1)[0]
            param = first if " " not in first and first.replace(".", "").replace("_", "").isalpha() else None
            raise OpenAIError(
                status, message, param, "model_not_found" if param == "model" and status == 404 else None
            ) from e

    async def close(self) -> None:
        await self.channel.close()


def fine_tuning_router(client: Any) -> APIRouter:
    """The endpoints over `client()`, which gives the ControllerClient (None: no controller)."""
    api = APIRouter()

    def controller() -> ControllerClient:
        c = client()
        if c is None:
            raise OpenAIError(
                503, "fine-tuning is not enabled: start the gateway with --controller HOST:PORT"
            )
        return c

    @api.post("/v1/files")
    async def upload_file(file: UploadFile = File(...), purpose: str = Form(...)):
        content = await file.read()
        f = await controller().call("UploadFile", pb.UploadFileRequest(filename=file.filename or "upload.jsonl",
                                                                      purpose=purpose, content=content))  # fmt: skip
        return file_json(f)

    @api.get("/v1/files")
    async def list_files(purpose: str = "", after: str | None = None, limit: int = 10000):
        resp = await controller().call("ListFiles", pb.ListFilesRequest(purpose=purpose))
        return page([file_json(f) for f in resp.files], after, limit)

    @api.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_json(await controller().call("GetFile", pb.FileRequest(id=file_id)))

    @api.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        resp = await controller().call("DeleteFile", pb.FileRequest(id=file_id))
        return {"id": resp.id, "object": "file", "deleted": resp.deleted}

    @api.post("/v1/fine_tuning/jobs")
    async def create_job(body: CreateJob):
        return job_json(await controller().call("CreateJob", pb.CreateJobRequest(spec=body.spec())))

    @api.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = 20):
        resp = await controller().call("ListJobs", pb.ListJobsRequest(limit=limit, after=after or ""))
        return {"object": "list", "data": [job_json(j) for j in resp.jobs], "has_more": resp.has_more}

    @api.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_json(await controller().call("GetJob", pb.JobRequest(id=job_id)))

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return job_json(await controller().call("CancelJob", pb.JobRequest(id=job_id)))

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, after: str | None = None, limit: int = 20):
        resp = await controller().call("ListEvents", pb.ListEventsRequest(id=job_id))
        return page([event_json(e) for e in reversed(resp.events)], after, limit)  # newest first

    @api.delete("/v1/models/{model}")
    async def delete_model(model: str):
        resp = await controller().call("DeleteModel", pb.DeleteModelRequest(model=model))
        return {"id": resp.model, "object": "model", "deleted": resp.deleted}

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        job = await controller().call("GetJob", pb.JobRequest(id=job_id))
        resp = await controller().call("ListCheckpoints", pb.JobRequest(id=job_id))
        model = job.fine_tuned_model or f"ft:{job.spec.model}:{job.spec.suffix}:{job.id}"
        return page([checkpoint_json(c, model) for c in resp.checkpoints], after, limit)

    return api
