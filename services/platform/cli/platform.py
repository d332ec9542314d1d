"""`tandem up | status | scale | down`: the whole platform on Ray.

    tandem up [--config FILE] [--address RAY_ADDRESS]     foreground; Ctrl-C takes everything down
    tandem status [--json]
    tandem scale prefill=N decode=M
    tandem down

`up` starts a local Ray (or joins the cluster at --address), creates the platform's controller actor
(named `controller` in the `tandem` namespace), which launches every service as a Ray actor, then
sends a one-token chat request through the gateway and says the platform is ready only once it is
answered. The other commands join the same Ray cluster (`--address`, default: the local one) and
talk to that controller.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from services.gateway.auth import exposure_warning, plain_keys
from services.platform.deploy.config import ConfigError, load_config
from shared import envs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the whole platform on Ray (foreground)")
    p.add_argument("--config", type=Path, help="deployment config YAML (default: deploy/local.yaml)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="the running platform's services, roles, addresses, health, load")
    p.add_argument("--address", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("scale", help="set the number of workers per role, e.g. prefill=2 decode=1")
    p.add_argument("counts", nargs="+", metavar="ROLE=N")
    p.add_argument("--address", default="auto")
    p.set_defaults(func=cmd_scale)
    p = sub.add_parser("down", help="stop the running platform")
    p.add_argument("--address", default="auto")
    p.set_defaults(func=cmd_down)


def _ray_init(address: str | None, num_cpus: float | None = None):
    import ray

    from services.platform.deploy.actors import NAMESPACE

    kwargs = dict(namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    context = ray.init(**kwargs)
    return ray, getattr(context, "dashboard_url", None) or None


def _controller(address: str):
    try:
        ray, _ = _ray_init(address)
    except (ConnectionError, RuntimeError) as e:
        raise ValueError(f"no Ray cluster to join at '{address}' (is `tandem up` running?): {e}") from e
    from services.platform.deploy.actors import CONTROLLER

    try:
        return ray, ray.get_actor(CONTROLLER)
    except ValueError as e:
        raise ValueError(
            "no Tandem platform is running on this Ray cluster (start one with `tandem up`)"
        ) from e


def cmd_up(args) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise ValueError(f"config: {e}") from e
    workers = cfg.prefill_workers + cfg.decode_workers + cfg.monolithic_workers
    roles = ["tokenizer", "kvstore", "router", "gateway", *(["controller"] if cfg.training.enabled else [])]
    wanted = sum(cfg.resources_for(r).num_cpus for r in roles) + sum(
        cfg.resources_for(r).num_cpus * n
        for r, n in (("prefill", cfg.prefill_workers), ("decode", cfg.decode_workers * cfg.ep_size),
                     ("monolithic", cfg.monolithic_workers * cfg.ep_size))
    )  # fmt: skip
    # A local Ray gets enough logical CPUs for the config plus room to scale: on a small machine the
    # services share cores (torch threads per role are what bound the real CPU use).
    num_cpus = None if args.address else max(os.cpu_count() or 1, math.ceil(wanted) + 4)
    started = time.monotonic()
    ray, dashboard = _ray_init(args.address, num_cpus)
    from services.platform.deploy.actors import CONTROLLER, Controller

    try:
        ray.get_actor(CONTROLLER)
        raise ValueError("a Tandem platform is already running on this Ray cluster (`tandem down` first)")
    except ValueError as e:
        if "already running" in str(e):
            raise
    warning = exposure_warning(cfg.gateway.host, [*cfg.gateway.api_keys, *envs.api_keys()])
    if warning:
        print(warning, file=sys.stderr, flush=True)
    security = envs.security_env()
    env = {"runtime_env": {"env_vars": security}} if security else {}
    controller = Controller.options(name=CONTROLLER, num_cpus=0, **env).remote(cfg.to_dict())
    try:
        print(
            f"starting {workers} worker(s) and {len(roles)} services on Ray ...", file=sys.stderr, flush=True
        )
        addresses = ray.get(controller.up.remote())
        gateway = f"http://{addresses['gateway']}"
        _wait_first_token(gateway, cfg)
        took = time.monotonic() - started
        ray_dashboard = f"http://{dashboard}" if dashboard else "off (the local Ray runs without it)"
        print(
            f"Tandem is ready in {took:.1f}s\n"
            f"  API (OpenAI-compatible)  {gateway}/v1\n"
            f"  API docs                 {gateway}/docs\n"
            f"  health                   {gateway}/health\n"
            f"  dashboard                {gateway}/dashboard\n"
            f"  metrics (Prometheus)     every service's: {gateway}/dashboard/targets (http_sd)\n"
            f"  Ray dashboard            {ray_dashboard}\n"
            f"  status                   tandem status   (scale: tandem scale prefill=N decode=M)\n"
            f"Ctrl-C or `tandem down` stops it.",
            flush=True,
        )
        while ray.get(controller.get_state.remote()) == "up":
            time.sleep(1.0)
        # `tandem down` is stopping it: wait until that is done (the controller dies with this
        # process, its owner, so leaving early would cut the shutdown short)
        while ray.get(controller.get_state.remote()) == "stopping":
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr, flush=True)
    finally:
        try:
            ray.get(controller.down.remote(), timeout=120)
        except Exception:  # noqa: BLE001 - shutting down regardless
            pass
        ray.shutdown()
    print("Tandem stopped.", file=sys.stderr, flush=True)
    return 0


def _wait_first_token(gateway: str, cfg, timeout: float = 300) -> None:
    """Until the gateway answers a one-token chat (or, when only hashed keys are configured and no
    request can be made, until /health is 200)."""
    entries = [*cfg.gateway.api_keys, *envs.api_keys()]  # the gateway takes both (a Secret's, on Kubernetes)
    keys = plain_keys(entries)
    if entries and not keys:
        _poll(lambda h: h.get(f"{gateway}/health", timeout=30), timeout, "become healthy")
        return
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    body = {"model": cfg.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    _poll(lambda h: h.post(f"{gateway}/v1/chat/completions", json=body, headers=headers, timeout=60), timeout,
          "serve a first token")  # fmt: skip


def _poll(request, timeout: float, what: str) -> None:
    """Repeat `request(httpx)` until it answers 200; RuntimeError with the last answer after `timeout`."""
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = request(httpx)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"the platform did not {what} within {timeout:.0f}s: {last}")


def cmd_status(args) -> int:
    ray, controller = _controller(args.address)
    status = ray.get(controller.status.remote())
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"platform: {status['state']}   workers: {status['counts']}   restarts: {status['restarts']}")
    for s in status["services"]:
        load = s.get("load") or {}
        extra = ""
        if "running" in load:
            extra = f"running={load['running']} waiting={load['waiting']} kv_usage={load['kv_usage']:.2f}"
        if "shards" in s:
            extra += f" shards={s['shards']} expert_imbalance={s['expert_imbalance']}"
        health = "healthy" if s["healthy"] else f"UNHEALTHY {s.get('error', '')}"
        print(f"  {s['name']:14s} {s['role']:11s} {s.get('address') or '-':22s} {health:8s} {extra}")
    return 0


def cmd_scale(args) -> int:
    counts = {}
    for item in args.counts:
        role, _, n = item.partition("=")
        if role not in ("prefill", "decode", "monolithic") or not n.isdigit():
            raise ValueError(f"scale: expected ROLE=N with ROLE prefill, decode or monolithic; got '{item}'")
        counts[role] = int(n)
    ray, controller = _controller(args.address)
    try:
        result = ray.get(controller.scale.remote(counts))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if hasattr(e, "cause") else e
        raise ValueError(str(cause).splitlines()[-1]) from e
    print(f"workers: {result}")
    return 0


def cmd_down(args) -> int:
    ray, controller = _controller(args.address)
    try:
        ray.get(controller.down.remote(), timeout=180)
    except ray.exceptions.RayActorError:
        # the controller belongs to the `tandem up` process, which exits once the platform is down
        # and takes the controller with it, sometimes before this call's reply is sent; its services
        # are its children and go with it
        pass
    print("Tandem is down.")
    return 0
