"""The router's workers: who they are, whether they answer, how loaded they are and what their prefix
caches hold.

Each worker reports its role (monolithic, prefill, decode), model and KV layout through GetLoad,
polled every `health_interval` seconds (a worker that fails is skipped until it answers again), and
streams its prefix cache's changes (KVEvents) into the pool's prefix index: per worker, the set of
block keys it caches. A request's block keys are computed here with the same chain the engines use
(shared/core/kv_hash.py), so "how much of this prompt does worker w hold" is a few set lookups.
The worker list can change while serving (`set_workers`): removed workers finish what they run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from shared.core.kv_hash import BlockKey, prompt_block_keys
from shared.rpc.security import channel as open_channel
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("tandem.router")


@dataclass
class WorkerHandle:
    """One worker as the router sees it (a placement.WorkerView)."""

    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    healthy: bool = False
    load: worker_pb2.LoadReport | None = None
    requests: set[str] = field(default_factory=set)  # this router's requests running there now
    cached: set[BlockKey] = field(default_factory=set)  # block keys in its prefix cache (KV events)
    events_task: asyncio.Task | None = None

    @classmethod
    def connect(cls, address: str) -> WorkerHandle:
        channel = open_channel(address)
        return cls(address, channel, worker_pb2_grpc.WorkerStub(channel))

    @property
    def role(self) -> str:
        return self.load.role if self.load is not None else "monolithic"

    @property
    def score(self) -> int:
        """Load: the requests this router has running there, counted as they start and end (the
        worker's own report lags by up to a health interval)."""
        return len(self.requests)

    def match(self, keys: Sequence[BlockKey]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.cached:
            n += 1
        return n


class WorkerPool:
    def __init__(self, addresses: list[str], health_interval: float = 1.0, health_timeout: float = 2.0):
        if not addresses:
            raise ValueError("the router needs at least one worker address (--worker HOST:PORT)")
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.workers = [WorkerHandle.connect(a) for a in dict.fromkeys(addresses)]
        self.retired: list[WorkerHandle] = []  # removed by set_workers, finishing their requests
        self._health_task: asyncio.Task | None = None
        self._started = False

    async def start(self) -> None:
        self._started = True
        await self.check()
        self._health_task = asyncio.create_task(self._health_loop())
        for w in self.workers:
            w.events_task = asyncio.create_task(self._follow_kv_events(w))

    async def close(self) -> None:
        tasks = [t for t in [self._health_task, *(w.events_task for w in self.workers)] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in [*self.workers, *self.retired]:
            await w.channel.close()

    def set_workers(self, addresses: list[str]) -> None:
        """Serve exactly these workers from now on. New ones join after their first health check;
        removed ones get no new requests, finish the ones they run, and are then let go of."""
        if not addresses:
            raise ValueError("the router needs at least one worker")
        current = {w.address: w for w in self.workers}
        workers = []
        for address in dict.fromkeys(addresses):
            w = current.pop(address, None)
            if w is None:
                w = WorkerHandle.connect(address)
                if self._started:
                    asyncio.ensure_future(self._check(w))
                    w.events_task = asyncio.create_task(self._follow_kv_events(w))
                log.info("worker %s added", address)
            workers.append(w)
        for w in current.values():
            log.info("worker %s removed; draining %d request(s)", w.address, len(w.requests))
            if w.events_task is not None:
                w.events_task.cancel()
            self.retired.append(w)
        self.workers = workers

    def everyone(self) -> list[WorkerHandle]:
        """Current and retired workers (both may run this router's requests)."""
        return [*self.workers, *self.retired]

    # -- health and load ---------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.check()

    async def check(self) -> None:
        """Ask every worker for its load now; let go of drained retired ones."""
        await asyncio.gather(*(self._check(w) for w in self.workers))
        for w in [w for w in self.retired if not w.requests]:
            self.retired.remove(w)
            await w.channel.close()

    async def _check(self, w: WorkerHandle) -> None:
        try:
            w.load = await w.stub.GetLoad(worker_pb2.LoadRequest(), timeout=self.health_timeout)
            if not w.healthy:
                log.info("worker %s is up (%s, %s)", w.address, w.load.worker_id, w.load.role)
            w.healthy = True
        except grpc.aio.AioRpcError as e:
            if w.healthy:
                log.warning("worker %s is down: %s", w.address, e.code().name)
            w.healthy = False

    # -- prefix index ------------------------------------------------------------------------------

    async def _follow_kv_events(self, w: WorkerHandle) -> None:
        """Mirror a worker's prefix cache; start over (from its snapshot) after any break."""
        while True:
            try:
                async for batch in w.stub.KVEvents(worker_pb2.KVEventsRequest()):
                    if batch.reset:
                        w.cached = set(batch.stored)
                    else:
                        w.cached.difference_update(batch.removed)
                        w.cached.update(batch.stored)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
            w.cached = set()
            await asyncio.sleep(self.health_interval)

    def block_keys(self, prompt: Sequence[int], cache_salt: str, model: str = "") -> list[BlockKey]:
        """The prompt's block keys as the workers name them (from any worker's reported layout); a
        request for a LoRA fine-tune of the workers' model has the adapter in its keys."""
        for w in self.workers:
            if w.load is not None and w.load.kv_layout and w.load.block_size:
                lora = model if model and model != w.load.model else None
                return prompt_block_keys(
                    prompt, w.load.block_size, w.load.model, w.load.kv_layout, cache_salt or None, lora
                )
        return []

    def block_size(self) -> int:
        return next((w.load.block_size for w in self.workers if w.load is not None and w.load.block_size), 16)
