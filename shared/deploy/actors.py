"""The Ray actors of a Tandem platform.

ServiceActor runs one service (tokenizer, kvstore, worker, router, gateway) in its own process: its
gRPC (or HTTP) server lives on the actor's asyncio loop. `start()` starts it and returns its
address; a restarted actor (Ray restarts actors that die) comes back without a server, so the
controller calls `start()` again and tells the router the new address.

Controller is the platform's one named actor (`controller` in the `tandem` namespace): it places the
services with the resources each role asks for, wires them together (services find each other through
it, never through fixed ports), watches them, scales the workers and takes everything down. The
`tandem up` driver owns it, so when that driver exits, everything it started goes with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray

from shared.deploy.config import DeploymentConfig, Resources

log = logging.getLogger("tandem.deploy")
NAMESPACE = "tandem"
CONTROLLER = "controller"


@ray.remote(max_restarts=-1)
class ServiceActor:
    def __init__(self, kind: str, options: dict):
        self.kind = kind
        self.options = options
        self.address: str | None = None
        self.server = None
        self.service = None
        self.started_at = None
        self.lock = asyncio.Lock()

    def pid(self) -> int:
        return os.getpid()

    def get_address(self) -> str | None:
        return self.address

    async def start(self, port: int = 0) -> str:
        """Start the server (port 0: any free one; a restarted actor is given its old port back, so
        every address the platform handed out stays valid). Idempotent."""
        async with self.lock:
            if self.address is None:
                await self._start(port)
            return self.address

    async def _start(self, port: int) -> None:
        o = self.options
        import torch

        torch.set_num_threads(o.get("threads", 1))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        host = o.get("host", "127.0.0.1")
        if self.kind == "tokenizer":
            from services.tokenizer.server import start_server

            self.server = await start_server(_store(o), [o["model"]], host, port)
        elif self.kind == "kvstore":
            from services.kvstore.server import start_server
            from shared.kvstore import KVStore

            self.server = await start_server(KVStore(o["memory_mb"] * 2**20, o.get("redis_url")), host, port)
        elif self.kind == "worker":
            from services.worker.server import start_server
            from shared.engine import EngineConfig

            store = _store(o)
            info = store.get(o["model"])
            e = o["engine"]
            device = e["device"]
            if o.get("num_gpus", 0) > 0 and device == "cpu":
                device = "cuda"  # Ray gave this actor a GPU (CUDA_VISIBLE_DEVICES names it)
            config = EngineConfig(
                device=device,
                dtype=e["dtype"],
                kv_cache_bytes=e["kv_cache_mb"] * 2**20,
                max_num_seqs=e["max_num_seqs"],
                max_num_batched_tokens=e["max_num_batched_tokens"],
            )
            self.server, self.service = await start_server(
                store.path(info.name), info.name, config, host, port,
                role=o["role"], kvstore=o.get("kvstore"), worker_id=o.get("worker_id"),
            )  # fmt: skip
        elif self.kind == "router":
            from services.router.server import start_server

            self.server, self.service = await start_server(o["workers"], host, port, **o["router"])
        elif self.kind == "gateway":
            self.address = await self._start_gateway(o, port)
            self.started_at = time.time()
            return
        else:
            raise ValueError(f"unknown service kind '{self.kind}'")
        self.address = self.server.address
        self.started_at = time.time()

    async def _start_gateway(self, o: dict, port: int) -> str:
        import uvicorn

        from services.gateway.app import create_app

        app = create_app(o["tokenizer"], o["router"], [o["model"]], o.get("api_keys") or [])
        server = uvicorn.Server(
            uvicorn.Config(app, host=o["host"], port=port or o["port"], log_level="warning")
        )
        server.install_signal_handlers = lambda: None  # the actor, not uvicorn, owns the process
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"the gateway could not listen on {o['host']}:{o['port']}")
            await asyncio.sleep(0.05)
        self.server = (server, task)
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"{o['host']}:{port}"

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
        """Drain and stop the server (in-flight requests finish first)."""
        if self.server is None:
            return
        if self.kind == "gateway":
            server, task = self.server
            server.should_exit = True
            await task
        elif self.service is not None:
            await self.server.stop(self.service.close)
        else:
            await self.server.stop()
        self.server, self.address = None, None


def _store(options: dict):
    from pathlib import Path

    from shared import envs
    from shared.store import ModelStore

    return ModelStore(Path(options["model_store"]) if options.get("model_store") else envs.models_dir())


def actor_options(res: Resources) -> dict:
    return {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}


@ray.remote
class Controller:
    def __init__(self, config: dict):
        from shared.deploy.config import _build

        self.cfg: DeploymentConfig = _build(DeploymentConfig, config, "")
        self.state = "starting"
        self.services: dict[str, tuple[ServiceActor, str]] = {}  # name -> (actor, role)
        self.launching: set[str] = set()  # names whose first start() is still running
        self.addresses: dict[str, str] = {}
        self.counter = 0
        self.monitor: asyncio.Task | None = None
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def up(self) -> dict:
        cfg = self.cfg
        base = {"model": cfg.model, "model_store": cfg.model_store}
        await asyncio.gather(
            self._launch("tokenizer", "tokenizer", base),
            self._launch(
                "kvstore", "kvstore", {"memory_mb": cfg.kvstore.memory_mb, "redis_url": cfg.kvstore.redis_url}
            ),
        )
        await asyncio.gather(
            *(self._add_worker("prefill") for _ in range(cfg.prefill_workers)),
            *(self._add_worker("decode") for _ in range(cfg.decode_workers)),
            *(self._add_worker("monolithic") for _ in range(cfg.monolithic_workers)),
        )
        router_opts = {
            "workers": self.worker_addresses(),
            "router": {**cfg.router.__dict__, "kvstore": self.addresses["kvstore"]},
        }
        await self._launch("router", "router", router_opts)
        gateway_opts = {
            **base,
            "tokenizer": self.addresses["tokenizer"],
            "router": self.addresses["router"],
            "host": cfg.gateway.host,
            "port": cfg.gateway.port,
            "api_keys": cfg.gateway.api_keys,
        }
        await self._launch("gateway", "gateway", gateway_opts)
        self.state = "up"
        self.monitor = asyncio.create_task(self._watch())
        return dict(self.addresses)

    async def down(self) -> None:
        if self.state == "down":
            return
        self.state = "stopping"
        if self.monitor is not None:
            self.monitor.cancel()
        # front to back: nothing new comes in while the rest drains
        order = ["gateway", "router"] + [n for n in self.services if n not in ("gateway", "router")]
        for name in order:
            if name in self.services:
                actor, _ = self.services.pop(name)
                try:
                    await asyncio.wait_for(actor.stop.remote(), 30)
                except Exception as e:  # noqa: BLE001 - it is killed next either way
                    log.warning("%s did not stop cleanly: %s", name, e)
                ray.kill(actor, no_restart=True)
        self.addresses.clear()
        self.state = "down"

    def get_state(self) -> str:
        return self.state

    # -- services ----------------------------------------------------------------------------------

    async def _launch(self, name: str, role: str, options: dict) -> str:
        res = self.cfg.resources_for(role)
        options = {**options, "threads": res.threads, "num_gpus": res.num_gpus}
        kind = "worker" if role in ("prefill", "decode", "monolithic") else role
        actor = ServiceActor.options(name=f"{NAMESPACE}-{name}", **actor_options(res)).remote(kind, options)
        self.services[name] = (actor, role)
        self.launching.add(name)
        try:
            self.addresses[name] = await actor.start.remote()
        finally:
            self.launching.discard(name)
        log.info("%s (%s) at %s", name, role, self.addresses[name])
        return self.addresses[name]

    async def _add_worker(self, role: str) -> str:
        self.counter += 1
        name = f"{role}-{self.counter}"
        e = self.cfg.engine
        options = {
            "model": self.cfg.model,
            "model_store": self.cfg.model_store,
            "role": role,
            "kvstore": self.addresses.get("kvstore"),
            "worker_id": name,
            "engine": e.__dict__,
        }
        return await self._launch(name, role, options)

    def worker_addresses(self) -> list[str]:
        return [
            self.addresses[n]
            for n, (_, role) in self.services.items()
            if role in ("prefill", "decode", "monolithic") and n in self.addresses
        ]

    async def _sync_router(self) -> None:
        if "router" in self.services:
            await self.services["router"][0].set_workers.remote(self.worker_addresses())

    async def _watch(self) -> None:
        """Start the servers of actors Ray restarted again, on their old ports: every address the
        platform handed out stays valid, and the router's health checks see the worker come back."""
        while True:
            await asyncio.sleep(1.0)
            for name, (actor, _) in list(self.services.items()):
                if name in self.launching or name not in self.addresses or self.state != "up":
                    continue
                try:
                    address = await actor.get_address.remote()
                    if address is None:
                        port = int(self.addresses[name].rsplit(":", 1)[1])
                        await actor.start.remote(port=port)
                        self.restarts += 1
                        log.warning("%s restarted at %s", name, self.addresses[name])
                except ray.exceptions.RayActorError:
                    continue  # being restarted; look again next round

    async def scale(self, counts: dict[str, int]) -> dict[str, int]:
        """Bring each worker role to the given count: new workers join the router; removed ones stop
        getting requests, finish what they run, then stop."""
        for role, n in counts.items():
            if role not in ("prefill", "decode", "monolithic") or n < 0:
                raise ValueError(f"scale: '{role}={n}' is not a worker role with a non-negative count")
        current = {r: [n for n, (_, role) in self.services.items() if role == r] for r in counts}
        total_after = sum(
            counts.get(r, len([1 for _, (_, role) in self.services.items() if role == r]))
            for r in ("decode", "monolithic")
        )
        if total_after < 1:
            raise ValueError("scale: at least one decode or monolithic worker must remain")
        adds = [self._add_worker(r) for r, n in counts.items() for _ in range(n - len(current[r]))]
        await asyncio.gather(*adds)
        removed = [name for r, n in counts.items() for name in current[r][n:] if n < len(current[r])]
        removed_addresses = [self.addresses.pop(name) for name in removed]
        await self._sync_router()
        # drain: wait until the router has no request left on the removed workers
        router = self.services["router"][0]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and set(await router.draining.remote()) & set(removed_addresses):
            await asyncio.sleep(0.2)
        for name in removed:
            actor, _ = self.services.pop(name)
            try:
                await asyncio.wait_for(actor.stop.remote(), 30)
            finally:
                ray.kill(actor, no_restart=True)
        return self.counts()

    def counts(self) -> dict[str, int]:
        out = {"prefill": 0, "decode": 0, "monolithic": 0}
        for _, role in self.services.values():
            if role in out:
                out[role] += 1
        return out

    async def status(self) -> dict:
        services = []
        for name, (actor, role) in self.services.items():
            entry = {"name": name, "role": role, "address": self.addresses.get(name)}
            try:
                entry["load"] = await asyncio.wait_for(actor.load.remote(), 5)
                entry["healthy"] = entry["address"] is not None
            except Exception as e:  # noqa: BLE001 - reported, not raised
                entry["healthy"], entry["error"] = False, str(e).splitlines()[0]
            services.append(entry)
        return {"state": self.state, "services": services, "restarts": self.restarts, "counts": self.counts()}

    async def pids(self) -> dict[str, int]:
        return {name: await actor.pid.remote() for name, (actor, _) in self.services.items()}
