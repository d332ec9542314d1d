"""`tandem train submit|list|get|logs|cancel`: fine-tuning jobs on a controller service.

    tandem train submit --controller HOST:PORT --model M --file data.jsonl [--method sft|dpo|pretrain]
                        [--lora | --full] [--suffix S] [--max-steps N] [--follow]
    tandem train list|get JOB|logs JOB [--follow]|cancel JOB --controller HOST:PORT

The controller's address comes from --controller or $TANDEM_CONTROLLER. `submit` uploads the file
(validated there, errors name file:line), creates the job and prints its id; with --follow it shows a
live progress line (step, loss, ETA) until the job ends, exiting 0 on success and 1 otherwise.
Errors print as `tandem: error: ...` with exit status 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from shared import envs


def register(tsub) -> None:
    def controller(q):
        q.add_argument("--controller", default=envs.controller_address(), help="controller HOST:PORT")

    q = tsub.add_parser("submit", help="upload a training file and start a fine-tuning job on the controller")
    controller(q)
    q.add_argument("--model", required=True, help="base model, by name in the model store")
    q.add_argument("--file", type=Path, required=True, help="training data (JSONL, OpenAI formats)")
    q.add_argument("--method", default="sft", choices=["sft", "dpo", "pretrain"])
    kind = q.add_mutually_exclusive_group()
    kind.add_argument("--lora", action="store_true", default=True, help="train a LoRA adapter (default)")
    kind.add_argument("--full", action="store_true", help="full fine-tune")
    q.add_argument("--suffix", default="")
    q.add_argument("--epochs", type=int)
    q.add_argument("--batch-size", type=int)
    q.add_argument("--learning-rate", type=float)
    q.add_argument("--max-steps", type=int)
    q.add_argument("--workers", type=int, default=1)
    q.add_argument("--gpus-per-worker", type=int, default=0)
    q.add_argument("--priority", type=int, default=0)
    q.add_argument("--follow", action="store_true", help="show progress until the job ends")
    q.set_defaults(func=cmd_submit)
    q = tsub.add_parser("list", help="fine-tuning jobs, newest first")
    controller(q)
    q.add_argument("--status", default="")
    q.set_defaults(func=cmd_list)
    for name, fn, text in (("get", cmd_get, "one job as JSON"), ("logs", cmd_logs, "a job's events"),
                           ("cancel", cmd_cancel, "cancel a job")):  # fmt: skip
        q = tsub.add_parser(name, help=text)
        controller(q)
        q.add_argument("job")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        q.set_defaults(func=fn)


def _stub(args):
    from shared.rpc.security import sync_channel
    from tandem.v1 import controller_pb2_grpc

    if not args.controller:
        raise ValueError("give the controller's address: --controller HOST:PORT or $TANDEM_CONTROLLER")
    return controller_pb2_grpc.ControllerStub(sync_channel(args.controller))


def _call(fn, request):
    import grpc

    try:  # wait_for_ready: a controller that is still starting is waited for, not an error
        return fn(request, timeout=120, wait_for_ready=True)
    except grpc.RpcError as e:
        raise ValueError(e.details() or e.code().name) from None


def _job_dict(job) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(job, preserving_proto_field_name=True)


def cmd_submit(args) -> int:
    from tandem.v1 import controller_pb2 as pb

    stub = _stub(args)
    try:
        content = args.file.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {args.file}: {e.strerror}") from e
    f = _call(
        stub.UploadFile, pb.UploadFileRequest(filename=args.file.name, purpose="fine-tune", content=content)
    )
    spec = pb.JobSpec(model=args.model, training_file=f.id, objective=args.method, suffix=args.suffix,
                      full=args.full, num_workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                      priority=args.priority)  # fmt: skip
    for field, value in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                         ("learning_rate", args.learning_rate), ("max_steps", args.max_steps)):  # fmt: skip
        if value is not None:
            setattr(spec, field, value)
    job = _call(stub.CreateJob, pb.CreateJobRequest(spec=spec))
    print(job.id, flush=True)
    return _follow(stub, job.id) if args.follow else 0


def cmd_list(args) -> int:
    from tandem.v1 import controller_pb2 as pb

    jobs = _call(_stub(args).ListJobs, pb.ListJobsRequest(status=args.status)).jobs
    for j in jobs:
        progress = f"{j.step}/{j.total_steps}" if j.total_steps else "-"
        print(
            f"{j.id}  {j.status:<10} {j.spec.model:<28} {progress:>9}  {j.fine_tuned_model or j.error[:60]}"
        )
    return 0


def cmd_get(args) -> int:
    from tandem.v1 import controller_pb2 as pb

    print(json.dumps(_job_dict(_call(_stub(args).GetJob, pb.JobRequest(id=args.job))), indent=2))
    return 0


def cmd_logs(args) -> int:
    from tandem.v1 import controller_pb2 as pb

    stub = _stub(args)
    if args.follow:
        return _follow(stub, args.job, quiet=False)
    for e in _call(stub.ListEvents, pb.ListEventsRequest(id=args.job)).events:
        print(f"[{e.level}] {e.message}")
    return 0


def cmd_cancel(args) -> int:
    from tandem.v1 import controller_pb2 as pb

    job = _call(_stub(args).CancelJob, pb.JobRequest(id=args.job))
    print(f"{job.id} {job.status}")
    return 0


def _follow(stub, job_id: str, quiet: bool = True) -> int:
    """Print events until the job ends: metrics as one live progress line on a terminal (stderr)."""
    import grpc

    from tandem.v1 import controller_pb2 as pb

    live = sys.stderr.isatty()
    try:
        for e in stub.WatchJob(pb.WatchJobRequest(id=job_id), wait_for_ready=True):
            if e.type == "metrics":
                data = json.loads(e.data_json)
                job = stub.GetJob(pb.JobRequest(id=job_id), timeout=30)
                line = _progress(data, max(0.0, job.estimated_finish - time.time()))
                print(("\r" + line) if live else line, end="" if live else "\n", file=sys.stderr, flush=True)
            elif (
                not quiet
                or e.level != "info"
                or "fine-tuned model" in e.message
                or e.message.startswith("Fine-tuning job started")
            ):
                print(("\n" if live else "") + f"[{e.level}] {e.message}", file=sys.stderr, flush=True)
    except grpc.RpcError as e:
        raise ValueError(e.details() or e.code().name) from None
    job = stub.GetJob(pb.JobRequest(id=job_id), timeout=30)
    if job.status == "succeeded":
        print(f"\n{job.id} succeeded: {job.fine_tuned_model}", file=sys.stderr)
        return 0
    print(
        f"\ntandem: error: job {job.id} {job.status}{': ' + job.error if job.error else ''}", file=sys.stderr
    )
    return 1


def _progress(data: dict, eta: float, width: int = 30) -> str:
    step, total = data["step"], max(data["total_steps"], 1)
    filled = int(width * step / total)
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] step {step}/{total}  loss {data['train_loss']:.4f}  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
