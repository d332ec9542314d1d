"""`tandem serve tokenizer|worker|router|kvstore|gateway`: run one service in the foreground.

Every option can also come from `--config FILE` (YAML; keys are the option names with underscores,
e.g. `max_num_seqs: 32`); flags on the command line win. gRPC services listen on --port (0, the
default, lets the OS pick a free port), print `<service> listening on HOST:PORT` on stdout when
ready and, with --port-file, write the port there. SIGTERM / Ctrl-C drains in-flight work and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import torch
import yaml

from services.router.placement import DEFAULT_POLICY, POLICIES
from shared import envs
from shared.core.dtypes import DTYPE_NAMES
from shared.store import DEFAULT_MODEL
from shared.telemetry.logs import configure_logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one platform service (tokenizer, worker, router, gateway)")
    roles = p.add_subparsers(dest="service", required=True, metavar="SERVICE")
    _tokenizer(roles)
    _worker(roles)
    _router(roles)
    _kvstore(roles)
    _controller(roles)
    _gateway(roles)


def _common(q, default_port: int = 0) -> None:
    """Options every service takes."""
    q.add_argument("--config", type=Path, help="YAML file with option values")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=default_port, help=f"(default {default_port or 'any free'})")
    q.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    if default_port == 0:  # the gRPC services (the gateway serves /metrics on its own port)
        q.add_argument("--metrics-port", type=int, default=0,
                       help="Prometheus metrics on this HTTP port (default any free one, announced)")  # fmt: skip
    q.add_argument("--log-format", choices=["json", "text"],
                   help="log lines as JSON objects or text (default $TANDEM_LOG_FORMAT, else json)")  # fmt: skip


def _tokenizer(roles) -> None:
    q = roles.add_parser("tokenizer", help="text <-> token ids, chat templates")
    _common(q)
    q.add_argument("--model", action="append", help=f"model to serve (repeatable; default {DEFAULT_MODEL})")
    q.add_argument("--store", type=Path)
    q.set_defaults(func=cmd_serve, run=run_tokenizer, parser=q)


def _worker(roles) -> None:
    q = roles.add_parser("worker", help="the engine behind gRPC (role: monolithic, prefill or decode)")
    _common(q)
    q.add_argument("--model", default=DEFAULT_MODEL)
    q.add_argument("--role", default="monolithic", choices=["monolithic", "prefill", "decode"])
    q.add_argument("--kvstore", help="KV-cache store HOST:PORT (prefix reuse and handoffs)")
    q.add_argument("--lease-ttl", type=float, default=60.0, help="seconds a handoff's blocks stay pinned")
    q.add_argument("--store", type=Path)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    q.add_argument("--max-num-seqs", type=int, default=64)
    q.add_argument("--max-num-batched-tokens", type=int, default=2048)
    q.add_argument("--kv-cache-mb", type=int, default=512)
    q.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", *DTYPE_NAMES],
        help="the KV cache's element type (auto: the model's dtype; float16 holds twice the tokens)",
    )  # fmt: skip
    q.add_argument(
        "--speculative", default="off", choices=["off", "ngram", "draft"],
        help="speculative decoding for requests that do not choose (their `speculative` extra)",
    )  # fmt: skip
    q.add_argument("--num-speculative-tokens", type=int, default=4, help="drafts verified per step")
    q.add_argument("--draft-model", help="the draft model of --speculative draft (a store model name)")
    q.add_argument(
        "--int8-activations", action="store_true",
        help="quantized models: int8 activations and integer dot products where the CPU has AVX-512 VNNI or AVX2",
    )  # fmt: skip
    q.add_argument(
        "--max-waiting", type=int, default=256, help="queue length beyond which requests are refused"
    )
    q.add_argument("--worker-id")
    q.add_argument("--threads", type=int, help="torch threads (default: $TANDEM_THREADS or 2)")
    q.set_defaults(func=cmd_serve, run=run_worker, parser=q)


def _router(roles) -> None:
    q = roles.add_parser("router", help="pick a worker per request, forward streams")
    _common(q)
    q.add_argument("--worker", action="append", required=False, help="worker HOST:PORT (repeatable)")
    q.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICIES)
    q.add_argument("--kvstore", help="KV-cache store HOST:PORT (prefix lookups, lease clean-up)")
    q.add_argument(
        "--disagg-threshold", type=int, default=256,
        help="prefill remotely when more uncached prompt tokens than this (default 256)",
    )  # fmt: skip
    q.add_argument(
        "--balance-threshold", type=int, default=4,
        help="prefix_aware: prefer the least loaded worker when the best match has this many more requests",
    )  # fmt: skip
    q.add_argument("--health-interval", type=float, default=1.0)
    q.add_argument("--request-timeout", type=float, default=600.0)
    q.add_argument(
        "--max-inflight", type=int, default=1024,
        help="requests forwarded at once; beyond it new ones are refused (RESOURCE_EXHAUSTED, HTTP 429)",
    )  # fmt: skip
    q.set_defaults(func=cmd_serve, run=run_router, parser=q)


def _kvstore(roles) -> None:
    q = roles.add_parser("kvstore", help="the remote KV-cache store (memory tier, optional Redis tier)")
    _common(q)
    q.add_argument("--memory-mb", type=int, default=1024, help="memory tier budget (default 1024)")
    q.add_argument("--redis", help="redis:// URL of the Redis tier (optional)")
    q.set_defaults(func=cmd_serve, run=run_kvstore, parser=q)


def _controller(roles) -> None:
    q = roles.add_parser("controller", help="training jobs: files, fine-tuning jobs, executors")
    _common(q)
    q.add_argument("--store", type=Path, help="the model store (default $TANDEM_MODELS)")
    q.add_argument("--home", type=Path, help="files and job dirs (default $TANDEM_HOME/controller)")
    q.add_argument("--job-store", help="sqlite:///PATH (default: <home>/controller.db) or redis://HOST:PORT")
    q.add_argument(
        "--executor", default="ray", choices=["ray", "kubernetes"], help="where jobs run by default"
    )
    q.add_argument("--ray-address", help="a Ray cluster for the ray executor (default: a local Ray per job)")
    q.add_argument("--cpus", type=int, help="trainer workers that may run at once (default: the CPU count)")
    q.add_argument(
        "--gpus", type=int, default=None, help="GPUs jobs may hold at once (default: those visible)"
    )
    q.add_argument("--threads-per-worker", type=int, default=1, help="torch threads of each trainer worker")
    q.add_argument("--k8s-namespace", help="enables the kubernetes executor: RayJobs go to this namespace")
    q.add_argument("--k8s-image", default="tandem:latest", help="the image of the RayJob pods")
    q.add_argument("--k8s-claim", help="the PersistentVolumeClaim holding TANDEM_HOME, mounted by the pods")
    q.add_argument("--poll-interval", type=float, default=0.5)
    q.set_defaults(func=cmd_serve, run=run_controller, parser=q)


def _gateway(roles) -> None:
    q = roles.add_parser("gateway", help="the OpenAI-compatible REST API")
    _common(q, default_port=8000)
    q.add_argument("--tokenizer", help="tokenizer service HOST:PORT")
    q.add_argument("--router", help="router service HOST:PORT")
    q.add_argument(
        "--model", action="append", help=f"served model name (repeatable; default {DEFAULT_MODEL})"
    )
    q.add_argument("--controller", help="controller service HOST:PORT (files and fine-tuning endpoints)")
    q.add_argument("--api-key", action="append", default=[],
                   help="require this bearer key, or a sha256:... spec with scopes and limits (repeatable)")  # fmt: skip
    q.add_argument("--max-body-mb", type=int, default=16, help="largest JSON request body (413 beyond)")
    q.add_argument("--max-upload-mb", type=int, default=512, help="largest POST /v1/files body")
    q.add_argument("--allow-priority", action="store_true", help="let clients set `priority`")
    q.add_argument("--drain-grace", type=float, default=30.0,
                   help="at SIGTERM, seconds in-flight requests get to finish (new ones: 503)")  # fmt: skip
    q.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one generation may take, start to end (default 600)")  # fmt: skip
    q.add_argument("--route-header", action="store_true",
                   help="answer with x-tandem-route (which workers served a request): for debugging")  # fmt: skip
    q.set_defaults(func=cmd_serve, run=run_gateway, parser=q)


def _apply_config(args) -> None:
    if not args.config:
        return
    try:
        values = yaml.safe_load(args.config.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read config {args.config}: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"config {args.config} must be a mapping of option: value")
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest in ("func", "run", "service", "config", "parser") or not hasattr(args, dest):
            raise ValueError(f"config {args.config}: unknown option '{key}' for `serve {args.service}`")
        # flags given on the command line win over the file
        if getattr(args, dest) == args.parser.get_default(dest):
            setattr(args, dest, value)


def cmd_serve(args) -> int:
    _apply_config(args)
    configure_logging(args.service, args.log_format, logging.getLogger().level)  # keeps -v
    asyncio.run(args.run(args))
    return 0


def _announce(running, port_file: Path | None) -> None:
    if port_file:
        port_file.write_text(str(running.port))
    where = f"; metrics on http://{running.metrics_address}/metrics" if running.metrics_address else ""
    if running.name == "gateway":
        where = ""  # (its /metrics is on the API port)
    print(f"{running.name} listening on {running.address}{where}", flush=True)


async def _serve(main, cfg, port_file: Path | None) -> None:
    """Build the service from its config, announce it, and serve until SIGTERM / Ctrl-C."""
    running = await main.build(cfg)
    _announce(running, port_file)
    await running.serve_until_signal()


def _listen(args) -> dict:
    return {"host": args.host, "port": args.port, "metrics_port": args.metrics_port}


async def run_tokenizer(args) -> None:
    from services.tokenizer import main

    cfg = main.Config(**_listen(args), models=tuple(args.model or [DEFAULT_MODEL]), store=_path(args.store))
    await _serve(main, cfg, args.port_file)


async def run_worker(args) -> None:
    from services.worker import main

    torch.set_num_threads(args.threads or envs.torch_threads(min(2, os.cpu_count() or 1)))
    cfg = main.Config(
        **_listen(args), model=args.model, store=_path(args.store), role=args.role, kvstore=args.kvstore,
        lease_ttl=args.lease_ttl, worker_id=args.worker_id, max_waiting=args.max_waiting, device=args.device,
        dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, kv_cache_mb=args.kv_cache_mb, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens, draft_model=args.draft_model,
        int8_activations=args.int8_activations,
    )  # fmt: skip
    await _serve(main, cfg, args.port_file)


async def run_router(args) -> None:
    from services.router import main

    cfg = main.Config(
        **_listen(args), workers=tuple(args.worker or ()), policy=args.policy, kvstore=args.kvstore,
        disagg_threshold=args.disagg_threshold, balance_threshold=args.balance_threshold,
        health_interval=args.health_interval, request_timeout=args.request_timeout, max_inflight=args.max_inflight,
    )  # fmt: skip
    await _serve(main, cfg, args.port_file)


async def run_kvstore(args) -> None:
    from services.kvstore import main

    await _serve(
        main, main.Config(**_listen(args), memory_mb=args.memory_mb, redis_url=args.redis), args.port_file
    )


async def run_controller(args) -> None:
    from services.controller import main

    gpus = (
        args.gpus
        if args.gpus is not None
        else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    )
    kubernetes = None
    if args.k8s_namespace:
        from kubernetes import config as k8s_config

        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()
        kubernetes = {"namespace": args.k8s_namespace, "image": args.k8s_image, "claim": args.k8s_claim,
                      "mount_path": str(envs.tandem_home())}  # fmt: skip
    elif args.executor == "kubernetes":
        raise ValueError("--executor kubernetes needs --k8s-namespace")
    cfg = main.Config(
        **_listen(args), home=_path(args.home), store=_path(args.store), job_store=args.job_store,
        executor=args.executor, ray_address=args.ray_address, cpus=args.cpus or os.cpu_count() or 1, gpus=gpus,
        threads_per_worker=args.threads_per_worker, kubernetes=kubernetes, poll_interval=args.poll_interval,
    )  # fmt: skip
    await _serve(main, cfg, args.port_file)


async def run_gateway(args) -> None:
    from services.gateway import main
    from services.gateway.auth import exposure_warning
    from services.gateway.protocol import Limits

    warning = exposure_warning(args.host, [*args.api_key, *envs.api_keys()])
    if warning:
        print(warning, file=sys.stderr, flush=True)
    limits = Limits(max_body_bytes=args.max_body_mb * 2**20, max_upload_bytes=args.max_upload_mb * 2**20,
                    allow_priority=args.allow_priority, route_header=args.route_header,
                    request_timeout_s=args.request_timeout)  # fmt: skip
    cfg = main.Config(
        host=args.host, port=args.port, tokenizer=args.tokenizer or "", router=args.router or "",
        models=tuple(args.model or [DEFAULT_MODEL]), controller=args.controller, api_keys=tuple(args.api_key),
        limits=limits, drain_grace=args.drain_grace,
    )  # fmt: skip
    await _serve(main, cfg, args.port_file)


def _path(p: Path | None) -> str | None:
    return str(p) if p else None
