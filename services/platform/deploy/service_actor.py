"""ServiceActor: one platform service in its own Ray actor process.

The platform controller (actors.py) hands each actor its service's own config (the frozen `Config`
of services/<kind>/main.py) and where it may run (`Placement`: torch threads, GPUs, bind). `start()`
calls that service's `build(cfg)` on the actor's asyncio loop and returns its address; a restarted
actor (Ray restarts actors that die) comes back without a server, so the controller calls `start()`
again, on the old port, and every address the platform handed out stays valid.

A worker of an expert-parallel group joins its process group first: the leader (rank 0) serves
with the group's engine, a follower serves nothing and steps with the leader on a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import time
from dataclasses import dataclass

import ray

from shared import envs
from shared.telemetry.logs import configure_logging

log = logging.getLogger("tandem.deploy")
NAMESPACE = "tandem"
CONTROLLER = "controller"
#: each kind of service and the module with its Config and build()
MAINS = {
    kind: f"services.{kind}.main"
    for kind in ("tokenizer", "kvstore", "worker", "router", "controller", "gateway")
}


def service_main(kind: str):
    if kind not in MAINS:
        raise ValueError(f"unknown service kind '{kind}'")
    return importlib.import_module(MAINS[kind])


@dataclass(frozen=True)
class Placement:
    """Where and how a service's actor runs (the platform's side of its config)."""

    threads: int = 1  # torch intra-op threads
    num_gpus: float = 0.0
    bind: str = "loopback"  # loopback | node (the Ray node's IP, reachable from other nodes)


@ray.remote(max_restarts=-1)
class ServiceActor:
    def __init__(self, kind: str, cfg, placement: Placement):
        self.kind = kind
        self.cfg = cfg  # services/<kind>/main.py's Config
        self.placement = placement
        self.ep: dict | None = None  # its place in an expert-parallel group: {"rank", "world", "init_method"}
        self.address: str | None = None
        self.metrics_address: str | None = None  # host:port of its Prometheus /metrics
        self.running = None  # shared.rpc.server.Running
        self.started_at = None
        self.lock = asyncio.Lock()
        # an expert-parallel shard's part: the group's engine, the leader's runner or the follower's
        # thread, a follower's metrics server, and whether the group broke (then it is restarted)
        self.group_engine = None
        self.group_runner = None
        self.follower = None
        self.follower_metrics = None
        self.group_failed = False

    def pid(self) -> int:
        return os.getpid()

    def get_address(self) -> str | None:
        return self.address

    def get_metrics_address(self) -> str | None:
        return self.metrics_address

    async def start(self, port: int = 0, ep: dict | None = None) -> str:
        """Start the service (port 0: any free one; a restarted actor is given its old port back).
        `ep`: this actor's place in an expert-parallel group. Idempotent."""
        async with self.lock:
            if self.address is None:
                if ep is not None:
                    self.ep = ep
                await self._start(port)
            return self.address

    async def _start(self, port: int) -> None:
        import torch

        torch.set_num_threads(self.placement.threads)
        configure_logging(self.kind if self.kind != "worker" else self.cfg.role)
        node = ray.util.get_node_ip_address()
        host = node if self.placement.bind == "node" else "127.0.0.1"
        main = service_main(self.kind)
        if self.kind == "gateway":  # it listens where its config says (a public address)
            cfg = dataclasses.replace(self.cfg, port=port or self.cfg.port, log_level="warning")
            self.running = await main.build(cfg, self._platform_status)
            h, p = self.running.address.rsplit(":", 1)  # a wildcard bind is announced by the node's IP
            self.address = self.metrics_address = f"{node if h in ('0.0.0.0', '::') else h}:{p}"
            self.started_at = time.time()
            return
        cfg = dataclasses.replace(self.cfg, host=host, port=port)
        if self.kind == "worker":
            if self.placement.num_gpus > 0 and cfg.device == "cpu":
                cfg = dataclasses.replace(
                    cfg, device="cuda"
                )  # Ray gave it a GPU (CUDA_VISIBLE_DEVICES names it)
            engine = None
            if self.ep is not None:
                engine = await asyncio.to_thread(self._join_group, cfg, self.ep)
                if self.ep["rank"] != 0:  # a follower: no server, its thread steps with the leader
                    self.address = f"shard {self.ep['rank']} of {self.ep['init_method']}"
                    self.metrics_address = self._follower_metrics(engine, host)
                    self.started_at = time.time()
                    return
            self.running = await main.build(cfg, engine=engine)
        elif self.kind == "controller":
            self.running = await main.build(dataclasses.replace(cfg, kubernetes=_in_cluster(cfg)))
        else:
            self.running = await main.build(cfg)
        self.address = self.running.address
        self.metrics_address = self.running.metrics_address
        self.started_at = time.time()

    @staticmethod
    async def _platform_status() -> dict:
        return await ray.get_actor(CONTROLLER).status.remote()

    @property
    def service(self):
        return self.running.service if self.running is not None else None

    # -- expert-parallel groups --------------------------------------------------------------------

    def _follower_metrics(self, engine, host: str) -> str:
        """A follower shard has no gRPC server: its MoE metrics get an HTTP server of their own."""
        from prometheus_client import CollectorRegistry

        from shared.telemetry.metrics import MetricsServer, Snapshot
        from shared.telemetry.moe import moe_metrics

        registry = CollectorRegistry()
        registry.register(Snapshot(lambda: moe_metrics(engine.model)))
        self.follower_metrics = MetricsServer(registry, host)
        return self.follower_metrics.address

    def _join_group(self, cfg, ep: dict):
        """Join the group's process group, load and shard the model; the leader's engine drives
        the group, a follower's runner follows it on a thread."""
        import datetime
        import threading

        import torch.distributed as dist

        from shared.engine import LLMEngine
        from shared.parallel.expert_parallel import shard_experts
        from shared.parallel.group_runner import follow, lead

        config = cfg.engine_config()
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend, init_method=ep["init_method"], rank=ep["rank"], world_size=ep["world"],
            timeout=datetime.timedelta(days=1),  # an idle group waits in its broadcast; deaths end it
        )  # fmt: skip
        engine = LLMEngine.from_store(cfg.model_dir(), config, model_id=cfg.model)
        shard_experts(engine.model)
        self.group_engine = engine
        if ep["rank"] == 0:
            self.group_runner = lead(engine)
        else:
            self.follower = threading.Thread(target=self._follow, args=(follow, engine), daemon=True)
            self.follower.start()
        return engine

    def _follow(self, follow, engine) -> None:
        try:
            follow(engine.runner)
        except Exception as e:  # noqa: BLE001 - the leader is gone; the controller restarts the group
            log.warning("expert-parallel follower stopped: %s", e)
        self.group_failed = True

    def free_address(self) -> str:
        """tcp://HOST:PORT of a free port on this node, for the group's rendezvous."""
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{sock.getsockname()[1]}"

    def expert_tokens(self) -> list[list[int]]:
        """Per MoE layer, tokens routed to each expert by this shard's requests (expert-parallel
        groups; empty otherwise)."""
        from shared.parallel.expert_parallel import moe_layers

        engine = self.group_engine
        return [m.expert_tokens.tolist() for m in moe_layers(engine.model)] if engine is not None else []

    # -- control -----------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """False when this actor serves nothing any more (a failed engine, a follower whose group
        broke) — the controller then restarts it (its whole group)."""
        if self.group_failed:
            return False
        if self.kind == "worker" and self.service is not None:
            return self.service.engine.dead is None and not self.service.stalled()  # (the watchdog)
        return True

    async def set_workers(self, workers: list[str]) -> None:
        """Router only: serve exactly these workers from now on (new ones join, removed ones drain)."""
        self.service.set_workers(workers)

    async def draining(self) -> list[str]:
        """Router only: removed workers that still have requests in flight."""
        return [w.address for w in self.service.retired if w.requests]

    async def load(self) -> dict:
        if self.kind == "worker" and self.service is not None:
            return {**self.service.engine.load(), "role": self.service.role}
        if self.kind == "router" and self.service is not None:
            return {
                "workers": [
                    {"address": w.address, "healthy": w.healthy, "running": len(w.requests)}
                    for w in self.service.workers
                ]
            }
        return {}

    async def stop(self) -> None:
        """Drain and stop the service (in-flight requests finish first)."""
        if self.running is None:
            return
        await self.running.stop()
        runner = self.group_runner
        if runner is not None:  # release the followers (best effort: one may be gone)
            try:
                await asyncio.wait_for(asyncio.to_thread(runner.close), 10)
            except Exception as e:  # noqa: BLE001 - the group is killed next either way
                log.warning("could not release the group's followers: %s", e)
        self.running, self.address = None, None


def _in_cluster(cfg) -> dict | None:
    """The Kubernetes executor's options, with the pod's credentials loaded, when the controller's
    config asks for that executor."""
    if cfg.executor != "kubernetes":
        return None
    from pathlib import Path

    from kubernetes import config as k8s_config

    k8s_config.load_incluster_config()
    options = dict(cfg.kubernetes or {})
    if not options.get("namespace"):
        own = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        options["namespace"] = own.read_text().strip() if own.is_file() else "default"
    options.setdefault("mount_path", str(envs.tandem_home()))
    return options
