"""The Ray actors of a Tandem platform.

ServiceActor runs one service (tokenizer, kvstore, worker, router, controller, gateway) in its own process: its
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
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.platform.deploy.config import DeploymentConfig, Resources
from shared import envs
from shared.telemetry.logs import configure_logging

log = logging.getLogger("tandem.deploy")
NAMESPACE = "tandem"
CONTROLLER = "controller"


@ray.remote(max_restarts=-1)
class ServiceActor:
    def __init__(self, kind: str, options: dict):
        self.kind = kind
        self.options = options
        self.address: str | None = None
        self.metrics_address: str | None = None  # host:port of its Prometheus /metrics
        self.server = None
        self.service = None
        self.started_at = None
        self.lock = asyncio.Lock()

    def pid(self) -> int:
        return os.getpid()

    def get_address(self) -> str | None:
        return self.address

    def get_metrics_address(self) -> str | None:
        return self.metrics_address

    async def start(self, port: int = 0, ep: dict | None = None) -> str:
        """Start the server (port 0: any free one; a restarted actor is given its old port back, so
        every address the platform handed out stays valid). `ep`: this actor's place in an
        expert-parallel group ({"rank", "world", "init_method"}). Idempotent."""
        async with self.lock:
            if self.address is None:
                if ep is not None:
                    self.options = {**self.options, "ep": ep}
                await self._start(port)
            return self.address

    async def _start(self, port: int) -> None:
        o = self.options
        import torch

        torch.set_num_threads(o.get("threads", 1))
        configure_logging(self.kind if self.kind != "worker" else o.get("role", "worker"))
        host = o.get("host") or (ray.util.get_node_ip_address() if o.get("bind") == "node" else "127.0.0.1")
        if self.kind == "tokenizer":
            from services.tokenizer.server import start_server

            self.server = await start_server(_store(o), [o["model"]], host, port)
        elif self.kind == "kvstore":
            from services.kvstore.server import start_server
            from shared.kvstore import KVStore

            store = KVStore(o["memory_mb"] * 2**20, o.get("redis_url"), redis_password=envs.redis_password())
            self.server = await start_server(store, host, port)
        elif self.kind == "worker":
            from services.worker.server import start_server
            from shared.engine import EngineConfig

            store = _store(o)
            info = store.get(o["model"])
            e = o["engine"]
            device = e["device"]
            if o.get("num_gpus", 0) > 0 and device == "cpu":
                device = "cuda"  # Ray gave this actor a GPU (CUDA_VISIBLE_DEVICES names it)
            ep = o.get("ep")  # {"rank", "world", "init_method"} for a shard of an expert-parallel group
            config = EngineConfig(
                device=device,
                dtype=e["dtype"],
                kv_cache_bytes=e["kv_cache_mb"] * 2**20,
                max_num_seqs=e["max_num_seqs"],
                max_num_batched_tokens=e["max_num_batched_tokens"],
            )
            engine = None
            if ep is not None:
                engine = await asyncio.to_thread(
                    self._join_group, store.path(info.name), info.name, config, ep
                )
                if ep["rank"] != 0:  # a follower: no server, its thread steps with the leader
                    self.address = f"shard {ep['rank']} of {ep['init_method']}"
                    self.metrics_address = self._follower_metrics(engine, host)
                    self.started_at = time.time()
                    return
            self.server, self.service = await start_server(
                store.path(info.name), info.name, config, host, port, engine=engine,
                role=o["role"], kvstore=o.get("kvstore"), worker_id=o.get("worker_id"),
            )  # fmt: skip
        elif self.kind == "controller":
            from services.controller.controller import Capacity
            from services.controller.server import build_controller, start_server

            t = o["training"]
            controller = build_controller(
                envs.tandem_home() / "controller", _store(o).root, t["job_store"], t["executor"],
                t["ray_address"], Capacity(t["cpus"], t["gpus"]), t["threads_per_worker"], _kubernetes(t),
            )  # fmt: skip
            self.server = await start_server(controller, host, port)
        elif self.kind == "router":
            from services.router.server import start_server

            self.server, self.service = await start_server(o["workers"], host, port, **o["router"])
        elif self.kind == "gateway":
            self.address = self.metrics_address = await self._start_gateway(o, port)  # /metrics on its port
            self.started_at = time.time()
            return
        else:
            raise ValueError(f"unknown service kind '{self.kind}'")
        self.address = self.server.address
        self.metrics_address = self.server.metrics_address
        self.started_at = time.time()

    def _follower_metrics(self, engine, host: str) -> str:
        """A follower shard has no gRPC server: its MoE metrics get an HTTP server of their own."""
        from prometheus_client import CollectorRegistry

        from shared.telemetry.metrics import MetricsServer, Snapshot
        from shared.telemetry.moe import moe_metrics

        registry = CollectorRegistry()
        registry.register(Snapshot(lambda: moe_metrics(engine.model)))
        self.follower_metrics = MetricsServer(registry, host)
        return self.follower_metrics.address

    def _join_group(self, path, model_id, config, ep: dict):
        """Join the group's process group, load and shard the model; the leader's engine drives
        the group, a follower's runner follows it on a thread."""
        import datetime
        import threading

        import torch.distributed as dist

        from shared.engine import LLMEngine
        from shared.parallel.expert_parallel import shard_experts
        from shared.parallel.group_runner import follow, lead

        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend, init_method=ep["init_method"], rank=ep["rank"], world_size=ep["world"],
            timeout=datetime.timedelta(days=1),  # an idle group waits in its broadcast; deaths end it
        )  # fmt: skip
        engine = LLMEngine.from_store(path, config, model_id=model_id)
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

        engine = getattr(self, "group_engine", None)
        return [m.expert_tokens.tolist() for m in moe_layers(engine.model)] if engine is not None else []

    def healthy(self) -> bool:
        """False when this actor serves nothing any more (a failed engine, a follower whose group
        broke) — the controller then restarts it (its whole group)."""
        if getattr(self, "group_failed", False):
            return False
        if self.kind == "worker" and self.service is not None:
            return self.service.engine.dead is None and not self.service.stalled()  # (the watchdog)
        return True

    async def _start_gateway(self, o: dict, port: int) -> str:
        import uvicorn

        from services.gateway.app import create_app
        from services.gateway.protocol import Limits
        from services.gateway.server import DrainingServer

        async def platform_status() -> dict:
            return await ray.get_actor(CONTROLLER).status.remote()

        app = create_app(
            o["tokenizer"], o["router"], [o["model"]], [*(o.get("api_keys") or []), *envs.api_keys()],
            platform_status,
            controller=o.get("controller"),
            limits=Limits(max_body_bytes=o["max_body_mb"] * 2**20, max_upload_bytes=o["max_upload_mb"] * 2**20,
                          allow_priority=o["allow_priority"], route_header=o["route_header"],
                          request_timeout_s=o["request_timeout_s"]),
        )  # fmt: skip
        server = DrainingServer(
            uvicorn.Config(app, host=o["host"], port=port or o["port"], log_level="warning", log_config=None)
        )  # (uvicorn takes no signals off the main thread: the actor's stop() drains it)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"the gateway could not listen on {o['host']}:{o['port']}")
            await asyncio.sleep(0.05)
        self.server = (server, task)
        port = server.servers[0].sockets[0].getsockname()[1]
        host = o["host"] if o["host"] not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
        return f"{host}:{port}"  # where others reach it (a wildcard bind is announced by the node's IP)

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
            await server.stop(task)  # new requests 503, in-flight ones finish
        elif self.service is not None:
            await self.server.stop(self.service.close)
            runner = getattr(self, "group_runner", None)
            if runner is not None:  # release the followers (best effort: one may be gone)
                try:
                    await asyncio.wait_for(asyncio.to_thread(runner.close), 10)
                except Exception as e:  # noqa: BLE001 - the group is killed next either way
                    log.warning("could not release the group's followers: %s", e)
        else:
            await self.server.stop()
        self.server, self.address = None, None


def _store(options: dict):
    from pathlib import Path

    from shared.store import ModelStore

    return ModelStore(Path(options["model_store"]) if options.get("model_store") else envs.models_dir())


def _kubernetes(training: dict) -> dict | None:
    """The Kubernetes executor's options (in-cluster credentials), when the config asks for it."""
    if training["executor"] != "kubernetes":
        return None
    from pathlib import Path

    from kubernetes import config as k8s_config

    k8s_config.load_incluster_config()
    own = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    namespace = training["k8s_namespace"] or (own.read_text().strip() if own.is_file() else "default")
    return {"namespace": namespace, "image": training["k8s_image"], "claim": training["k8s_claim"],
            "mount_path": str(envs.tandem_home())}  # fmt: skip


def actor_options(res: Resources) -> dict:
    options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:  # e.g. {"tandem-gateway": 1}: only the node that offers it (a Kubernetes head pod)
        options["resources"] = dict(res.custom)
    if security := envs.security_env():  # the internal token / TLS travel with the actor to any node
        options["runtime_env"] = {"env_vars": security}
    return options


@ray.remote
class Controller:
    def __init__(self, config: dict):
        from services.platform.deploy.config import _build

        self.cfg: DeploymentConfig = _build(DeploymentConfig, config, "")
        self.state = "starting"
        self.services: dict[str, tuple[ServiceActor, str]] = {}  # name -> (actor, role)
        self.launching: set[str] = set()  # names whose first start() is still running
        self.addresses: dict[str, str] = {}
        self.counter = 0
        self.monitor: asyncio.Task | None = None
        self.restarts = 0
        self.groups: dict[str, list] = {}  # expert-parallel worker name -> its shard actors (rank order)
        self.worker_options: dict[str, dict] = {}  # worker name -> the options it was launched with
        self.placement: dict[str, object] = {}  # group name -> its placement group
        self.stopping: asyncio.Task | None = None  # the one shutdown every `down` caller waits for

    # -- lifecycle ---------------------------------------------------------------------------------

    async def up(self) -> dict:
        cfg = self.cfg
        base = {"model": cfg.model, "model_store": cfg.model_store}
        training = None  # the training controller needs nothing else: it starts beside the rest
        if cfg.training.enabled:
            options = {**base, "training": cfg.training.__dict__}
            training = asyncio.ensure_future(self._launch("training", "controller", options))
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
        if training is not None:
            await training
        gateway_opts = {
            **base,
            "tokenizer": self.addresses["tokenizer"],
            "router": self.addresses["router"],
            "host": cfg.gateway.host,
            "port": cfg.gateway.port,
            "api_keys": cfg.gateway.api_keys,
            "max_body_mb": cfg.gateway.max_body_mb,
            "max_upload_mb": cfg.gateway.max_upload_mb,
            "allow_priority": cfg.gateway.allow_priority,
            "route_header": cfg.gateway.route_header,
            "request_timeout_s": cfg.gateway.request_timeout_s,
            "controller": self.addresses.get("training"),
        }
        await self._launch("gateway", "gateway", gateway_opts)
        self.state = "up"
        self.monitor = asyncio.create_task(self._watch())
        return dict(self.addresses)

    async def down(self) -> None:
        """Stops every service, front to back. Concurrent callers (`tandem down` and the `up` process
        that sees the platform stopping) share one shutdown, so none returns before it is finished."""
        if self.stopping is None:
            self.stopping = asyncio.ensure_future(self._stop_all())
        await asyncio.shield(self.stopping)

    async def _stop_all(self) -> None:
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
                for member in self.groups.pop(name, [actor]):
                    ray.kill(member, no_restart=True)
                if name in self.placement:
                    remove_placement_group(self.placement.pop(name))
        self.addresses.clear()
        self.state = "down"

    def get_state(self) -> str:
        return self.state

    # -- services ----------------------------------------------------------------------------------

    async def _launch(self, name: str, role: str, options: dict) -> str:
        res = self.cfg.resources_for(role)
        options = {**options, "threads": res.threads, "num_gpus": res.num_gpus, "bind": self.cfg.bind}
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

    async def _launch_group(self, name: str, role: str, options: dict, port: int = 0) -> str:
        """`ep_size` shard actors joined in one process group; rank 0 serves, the rest follow."""
        res = self.cfg.resources_for(role)
        world = self.cfg.ep_size
        options = {**options, "threads": res.threads, "num_gpus": res.num_gpus, "bind": self.cfg.bind}
        # the shards are placed together (one node: the all-to-all stays on the node's fabric)
        bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
        pg = placement_group([bundle] * world, strategy="STRICT_PACK")
        await pg.ready()
        self.placement[name] = pg
        actors = [
            ServiceActor.options(
                name=f"{NAMESPACE}-{name}-shard{r}",
                **actor_options(res),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote("worker", options)
            for r in range(world)
        ]
        self.groups[name] = actors
        self.services[name] = (actors[0], role)
        self.launching.add(name)
        try:
            init = await actors[0].free_address.remote()
            addresses = await asyncio.gather(
                *(
                    actor.start.remote(
                        port if r == 0 else 0, {"rank": r, "world": world, "init_method": init}
                    )
                    for r, actor in enumerate(actors)
                )
            )
        finally:
            self.launching.discard(name)
        self.addresses[name] = addresses[0]
        log.info("%s (%s, %d shards) at %s", name, role, world, addresses[0])
        return addresses[0]

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
        self.worker_options[name] = options
        if self.cfg.ep_size > 1 and role in ("decode", "monolithic"):  # prefill workers stay whole
            return await self._launch_group(name, role, options)
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
        """Bring failed services back, on their old ports, so every address the platform handed out
        stays valid and the router's health checks see a worker return:
          - an actor Ray restarted (its process died) gets its server started again;
          - an actor alive but serving nothing (a failed engine) is killed for Ray to restart;
          - an expert-parallel group with any failed shard is replaced as a whole."""
        while True:
            await asyncio.sleep(1.0)
            for name, (actor, _) in list(self.services.items()):
                if name in self.launching or name not in self.addresses or self.state != "up":
                    continue
                port = int(self.addresses[name].rsplit(":", 1)[1])
                try:
                    if name in self.groups:
                        if not await self._group_ok(self.groups[name]):
                            await self._restart_group(name, port)
                        continue
                    address = await actor.get_address.remote()
                    if address is None:
                        await actor.start.remote(port=port)
                        self.restarts += 1
                        log.warning("%s restarted at %s", name, self.addresses[name])
                        if name == "router":  # it started with its first worker list: give it today's
                            await self._sync_router()
                    elif not await actor.healthy.remote():
                        log.warning("%s is alive but failed; restarting it", name)
                        ray.kill(actor, no_restart=False)
                except ray.exceptions.RayActorError:
                    continue  # being restarted; look again next round
                except Exception:  # noqa: BLE001 - a failed restart is retried next round
                    log.exception("bringing %s back failed; trying again", name)

    async def _group_ok(self, actors: list) -> bool:
        try:
            for actor in actors:
                if await actor.get_address.remote() is None or not await actor.healthy.remote():
                    return False
        except ray.exceptions.RayActorError:
            return False
        return True

    async def _restart_group(self, name: str, port: int) -> None:
        log.warning("expert-parallel group %s lost a shard; restarting the group", name)
        self.launching.add(name)
        old = self.groups.pop(name)
        for member in old:
            ray.kill(member, no_restart=True)
        if name in self.placement:
            remove_placement_group(self.placement.pop(name))
        for member in old:  # wait until they are gone: the new leader takes the old one's port
            for _ in range(100):
                try:
                    await asyncio.wait_for(member.pid.remote(), 1)
                    await asyncio.sleep(0.1)
                except (TimeoutError, ray.exceptions.RayActorError):
                    break
        self.launching.discard(name)
        role = self.services[name][1]
        await self._launch_group(name, role, self.worker_options[name], port)
        self.restarts += 1

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
                for member in self.groups.pop(name, [actor]):
                    ray.kill(member, no_restart=True)
                if name in self.placement:
                    remove_placement_group(self.placement.pop(name))
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
            entry["metrics"] = await self._metrics_addresses(self.groups.get(name, [actor]))
            if name in self.groups:
                entry["shards"] = len(self.groups[name])
                entry["expert_tokens"] = await self._group_expert_tokens(self.groups[name])
                flat = [c for layer in entry["expert_tokens"] for c in layer]
                mean = sum(flat) / len(flat) if flat else 0
                entry["expert_imbalance"] = round(max(flat) / mean, 3) if mean else 1.0
            try:
                entry["load"] = await asyncio.wait_for(actor.load.remote(), 5)
                entry["healthy"] = entry["address"] is not None
            except Exception as e:  # noqa: BLE001 - reported, not raised
                # (a timeout's message is empty: name the exception instead)
                entry["healthy"], entry["error"] = False, (str(e).splitlines() or [type(e).__name__])[0]
            services.append(entry)
        return {"state": self.state, "services": services, "restarts": self.restarts, "counts": self.counts()}

    async def _metrics_addresses(self, actors) -> list[str]:
        """Where the service's processes serve /metrics (a group: every shard, leader first)."""
        out = []
        for actor in actors:
            try:
                address = await asyncio.wait_for(actor.get_metrics_address.remote(), 5)
            except Exception:  # noqa: BLE001 - one being replaced: list what answers
                continue
            if address:
                out.append(address)
        return out

    async def _group_expert_tokens(self, actors) -> list[list[int]]:
        """The group's per-layer, per-expert routed-token counts (summed over its shards)."""
        total: list[list[int]] = []
        for actor in actors:
            try:
                counts = await asyncio.wait_for(actor.expert_tokens.remote(), 5)
            except Exception:  # noqa: BLE001 - a shard being replaced: count what answers
                continue
            if not counts or (total and [len(x) for x in counts] != [len(x) for x in total]):
                continue  # a shard restarting (no model loaded yet) has nothing to add
            if not total:
                total = [list(layer) for layer in counts]
            else:
                total = [
                    [a + b for a, b in zip(x, y, strict=True)] for x, y in zip(total, counts, strict=True)
                ]
        return total

    async def pids(self) -> dict[str, int]:
        out = {name: await actor.pid.remote() for name, (actor, _) in self.services.items()}
        for name, actors in self.groups.items():
            for r, actor in enumerate(actors):
                out[f"{name}-shard{r}"] = await actor.pid.remote()
        return out
