"""`tandem train run|validate --config JOB.yaml`: a training job run directly on Ray Train.

`run` validates the spec and the whole dataset, trains (a local Ray unless --address names a
cluster), and adds the result to the model store under the job's output_name. Progress goes to
stderr; stdout gets one JSON object summing the run up. Running a stopped or crashed job again
resumes it from its latest checkpoint. `validate` does everything up to the first step.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from shared.train.config import load_job

log = logging.getLogger("tandem.train")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model (pretrain, SFT, DPO; full or LoRA)")
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="ACTION")
    run = tsub.add_parser("run", help="run a training job and add its result to the model store")
    run.add_argument("--config", type=Path, required=True, help="the job spec (YAML)")
    run.add_argument("--until-step", type=int, default=None, help="stop after this step with a checkpoint")
    run.add_argument("--address", default=None, help="a Ray cluster to run on (default: a local Ray)")
    run.add_argument(
        "--result", type=Path, default=None,
        help="also write the outcome here as JSON, errors included (for the controller's executors)",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)
    val = tsub.add_parser("validate", help="check a job spec and its dataset without training")
    val.add_argument("--config", type=Path, required=True)
    val.set_defaults(func=cmd_validate)
    from services.platform.cli import train_jobs

    train_jobs.register(tsub)


def cmd_validate(args) -> int:
    from shared.train.job import prepare
    from shared.train.loop import plan_for

    job = load_job(args.config)
    _, examples = prepare(job)
    plan = plan_for(job, len(examples))
    print(
        json.dumps(
            {
                "examples": len(examples),
                "tokens": sum(e.num_tokens for e in examples),
                "target_tokens": sum(e.num_targets for e in examples),
                "total_steps": plan.total_steps,
            }
        )
    )
    return 0


def cmd_run(args) -> int:
    from shared.train.job import run_job

    if args.until_step is not None and args.until_step < 1:
        raise ValueError("--until-step must be at least 1")
    try:
        job = load_job(args.config)
        result = run_job(job, until_step=args.until_step, address=args.address)
    except Exception as e:
        _write_result(args.result, {"status": "failed", "error": str(e) or type(e).__name__})
        raise
    _write_result(args.result, result.summary())
    if result.status == "succeeded":
        log.info("trained '%s' in %d steps; serve it by that name", result.model, result.step)
    else:
        log.info(
            "stopped at step %d of %d; run the same job again to resume", result.step, result.total_steps
        )
    print(json.dumps(result.summary()))
    return 0


def _write_result(path: Path | None, outcome: dict) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(outcome))
        tmp.replace(path)  # whoever polls never sees half a file
