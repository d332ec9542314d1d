"""The platform controller: the Ray actor that runs a Tandem platform.

Each service runs in a ServiceActor (service_actor.py), given its own config (the Config of
services/<kind>/main.py), which this controller derives from the deployment config.

Controller is the platform's one named actor (`controller` in the `tandem` namespace): it places the
services with the resources each role asks for, wires them together (services find each other through
it, never through fixed ports), watches them, scales the workers and takes everything down. The
`tandem up` driver owns it, so when that driver exits, everything it started goes with it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.platform.deploy.config import DeploymentConfig, Resources
from services.platform.deploy.service_actor import (
    CONTROLLER,
    NAMESPACE,
    Placement,
    ServiceActor,
    service_main,
)
from shared import envs

log = logging.getLogger("tandem.deploy")
__all__ = ["CONTROLLER", "NAMESPACE", "Controller", "actor_options"]


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
        from services.platform.deploy.config import parse_config

        self.cfg: DeploymentConfig = parse_config(config)
        self.state = "starting"
        self.services: dict[str, tuple[ServiceActor, str]] = {}  # name -> (actor, role)
        self.launching: set[str] = set()  # names whose first start() is still running
        self.addresses: dict[str, str] = {}
        self.counter = 0
        self.monitor: asyncio.Task | None = None
        self.restarts = 0
        self.groups: dict[str, list] = {}  # expert-parallel worker name -> its shard actors (rank order)
        self.worker_configs: dict = {}  # worker name -> the Config it was launched with
        self.placement: dict[str, object] = {}  # group name -> its placement group
        self.stopping: asyncio.Task | None = None  # the one shutdown every `down` caller waits for

    # -- lifecycle ---------------------------------------------------------------------------------

    async def up(self) -> dict:
        cfg = self.cfg
        training = None  # the training controller needs nothing else: it starts beside the rest
        if cfg.training.enabled:
            training = asyncio.ensure_future(
                self._launch("training", "controller", self._config("controller"))
            )
        await asyncio.gather(
            self._launch("tokenizer", "tokenizer", self._config("tokenizer")),
            self._launch("kvstore", "kvstore", self._config("kvstore")),
        )
        await asyncio.gather(
            *(self._add_worker("prefill") for _ in range(cfg.prefill_workers)),
            *(self._add_worker("decode") for _ in range(cfg.decode_workers)),
            *(self._add_worker("monolithic") for _ in range(cfg.monolithic_workers)),
        )
        await self._launch("router", "router", self._config("router"))
        if training is not None:
            await training
        await self._launch("gateway", "gateway", self._config("gateway"))
        self.state = "up"
        self.monitor = asyncio.create_task(self._watch())
        return dict(self.addresses)

    def _config(self, kind: str, **extra):
        """A service's own Config (services/<kind>/main.py), from the deployment config and the
        addresses of the services started before it."""
        cfg, main = self.cfg, service_main(kind)
        if kind == "tokenizer":
            return main.Config(models=(cfg.model,), store=cfg.model_store)
        if kind == "kvstore":
            return main.Config(memory_mb=cfg.kvstore.memory_mb, redis_url=cfg.kvstore.redis_url)
        if kind == "worker":
            return main.Config(model=cfg.model, store=cfg.model_store, kvstore=self.addresses.get("kvstore"),
                               **cfg.engine.model_dump(), **extra)  # fmt: skip
        if kind == "router":
            return main.Config(workers=tuple(self.worker_addresses()), kvstore=self.addresses["kvstore"],
                               **cfg.router.model_dump())  # fmt: skip
        if kind == "controller":
            t = cfg.training
            kubernetes = {"namespace": t.k8s_namespace, "image": t.k8s_image, "claim": t.k8s_claim}
            return main.Config(
                store=cfg.model_store, job_store=t.job_store, executor=t.executor, ray_address=t.ray_address,
                cpus=t.cpus, gpus=t.gpus, threads_per_worker=t.threads_per_worker,
                kubernetes=kubernetes if t.executor == "kubernetes" else None,
            )  # fmt: skip
        from services.gateway.protocol import Limits

        g = cfg.gateway
        return main.Config(
            host=g.host, port=g.port, tokenizer=self.addresses["tokenizer"], router=self.addresses["router"],
            models=(cfg.model,), controller=self.addresses.get("training"), api_keys=tuple(g.api_keys),
            limits=Limits(max_body_bytes=g.max_body_mb * 2**20, max_upload_bytes=g.max_upload_mb * 2**20,
                          allow_priority=g.allow_priority, route_header=g.route_header,
                          request_timeout_s=g.request_timeout_s),
        )  # fmt: skip

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

    def _placement(self, role: str) -> Placement:
        res = self.cfg.resources_for(role)
        return Placement(threads=res.threads, num_gpus=res.num_gpus, bind=self.cfg.bind)

    async def _launch(self, name: str, role: str, service_cfg) -> str:
        res = self.cfg.resources_for(role)
        kind = "worker" if role in ("prefill", "decode", "monolithic") else role
        actor = ServiceActor.options(name=f"{NAMESPACE}-{name}", **actor_options(res)).remote(
            kind, service_cfg, self._placement(role)
        )
        self.services[name] = (actor, role)
        self.launching.add(name)
        try:
            self.addresses[name] = await actor.start.remote()
        finally:
            self.launching.discard(name)
        log.info("%s (%s) at %s", name, role, self.addresses[name])
        return self.addresses[name]

    async def _launch_group(self, name: str, role: str, service_cfg, port: int = 0) -> str:
        """`ep_size` shard actors joined in one process group; rank 0 serves, the rest follow."""
        res = self.cfg.resources_for(role)
        world = self.cfg.ep_size
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
            ).remote("worker", service_cfg, self._placement(role))
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
        service_cfg = self._config("worker", role=role, worker_id=name)
        self.worker_configs[name] = service_cfg
        if self.cfg.ep_size > 1 and role in ("decode", "monolithic"):  # prefill workers stay whole
            return await self._launch_group(name, role, service_cfg)
        return await self._launch(name, role, service_cfg)

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
        await self._launch_group(name, role, self.worker_configs[name], port)
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
