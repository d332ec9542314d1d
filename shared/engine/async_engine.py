"""AsyncLLMEngine: the engine for asyncio servers.

    engine = AsyncLLMEngine(LLMEngine.from_store(path, config))
    stream = await engine.add_request("r1", prompt_ids, params)   # validated here; raises ValueError
    async for out in stream:                                        # RequestOutput per new token
        ...
    await engine.abort("r1")                                        # the stream ends with "abort"

The LLMEngine runs on one background thread that alone touches it: commands (add, abort) reach it
through a queue and are applied between steps, and each step's outputs are handed to the event loop
with call_soon_threadsafe. So a step (tens of milliseconds of matmuls, which release the GIL) never
blocks the event loop. A stream whose consumer stops early (`break`, cancellation, a closed client)
aborts its request when it is closed, so no KV block outlives its reader. If a step raises, every
open stream gets the error and the engine refuses new work (EngineDeadError).

KV events: `subscribe_kv_events()` returns a queue that first gets ("reset", every cached key), then
after each step the keys that became findable or were evicted, as (stored, removed) lists — in
order, since both are handed over by the engine thread itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

import torch

from shared.core.kv_hash import BlockKey
from shared.core.sampling_params import SamplingParams
from shared.engine.engine import LLMEngine, RequestOutput
from shared.engine.kv_transfer import KVHandoff

log = logging.getLogger("tandem.engine")


class EngineDeadError(RuntimeError):
    pass


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            await self.engine.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.busy_since: float | None = None  # when the step in progress began (engine thread)
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None
        self.streams: dict[str, RequestStream] = {}
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.stopping = False
        self.dead: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.kv_subscribers: set[asyncio.Queue] = set()
        engine.pool.record_events()

    # -- public API ------------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        kv_handoff: KVHandoff | None = None,
        prefix_kv: torch.Tensor | None = None,
        lora: str | None = None,
    ) -> RequestStream:
        self._ensure_running()
        if request_id in self.streams:
            raise ValueError(f"request_id '{request_id}' is already in use")
        stream = RequestStream(self, request_id)
        self.streams[request_id] = stream
        try:
            await self._call(
                self.engine.add_request,
                request_id,
                prompt_token_ids,
                params,
                prefill_only=prefill_only,
                kv_handoff=kv_handoff,
                prefix_kv=prefix_kv,
                lora=lora,
            )
        except BaseException as e:
            self.streams.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError):
                # the caller left while the engine thread may already be adding it: an abort queued
                # behind the add removes it either way, so no request without a reader holds blocks
                self.commands.put((concurrent.futures.Future(), self.engine.abort, (request_id,), {}))
                self.wakeup.set()
            raise
        return stream

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, **kwargs
    ) -> AsyncIterator[RequestOutput]:
        """add_request + iterate, aborting the request if the caller stops early."""
        stream = await self.add_request(request_id, prompt_token_ids, params, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def add_lora(self, name: str, path) -> None:
        """Load a LoRA adapter on the engine thread (see LLMEngine.add_lora); ValueError if it cannot."""
        self._ensure_running()
        await self._call(self.engine.add_lora, name, path)

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; its stream ends with a finish_reason "abort" output."""
        if self.dead is not None or self.thread is None:
            return False
        return await self._call(self._abort_on_engine_thread, request_id)

    async def call(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on the engine thread between steps (e.g. engine.read_cached)."""
        self._ensure_running()
        return await self._call(fn, *args, **kwargs)

    async def subscribe_kv_events(self) -> asyncio.Queue:
        """A queue of ("reset", keys) first, then ("delta", (stored, removed)) per step with changes.
        Drop it with unsubscribe_kv_events."""
        q: asyncio.Queue = asyncio.Queue()

        def snapshot():  # on the engine thread: nothing can change between the snapshot and the next delta
            keys = list(self.engine.pool.cached)
            self.loop.call_soon_threadsafe(self._add_subscriber, q, keys)

        await self.call(snapshot)
        return q

    def _add_subscriber(self, q: asyncio.Queue, keys: list[BlockKey]) -> None:
        q.put_nowait(("reset", keys))
        self.kv_subscribers.add(q)

    def unsubscribe_kv_events(self, q: asyncio.Queue) -> None:
        self.kv_subscribers.discard(q)

    def stalled_for(self) -> float:
        """Seconds the engine thread has been inside one step (0 when between steps): the watchdog's
        reading. A step normally takes milliseconds; a hung kernel or device shows here."""
        since = self.busy_since
        return time.monotonic() - since if since is not None else 0.0

    def load(self) -> dict:
        """Scheduler and cache state for routers and metrics (a snapshot; read without locking)."""
        eng = self.engine
        return {
            "running": len(eng.scheduler.running),
            "waiting": len(eng.scheduler.waiting),
            "kv_blocks_total": eng.pool.num_blocks,
            "kv_blocks_free": eng.pool.num_free,
            "kv_usage": eng.pool.usage,
            "prefix_cache_hit_blocks": eng.pool.hits,
            "num_preemptions": eng.scheduler.num_preemptions,
            "prompt_tokens_computed": eng.prompt_tokens_computed,
            "block_size": eng.config.block_size,
            "spec": {m: dataclasses.asdict(s) for m, s in eng.speculator.stats.items()},
        }

    async def shutdown(self) -> None:
        """Abort everything in flight and stop the engine thread."""
        if self.thread is None:
            return
        for request_id in list(self.streams):
            await self.abort(request_id)
        self.stopping = True
        self.wakeup.set()
        await asyncio.get_running_loop().run_in_executor(None, self.thread.join)
        self.thread = None

    # -- engine thread ---------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine failed and no longer accepts requests: {self.dead}")
        if self.thread is None:
            self.loop = asyncio.get_running_loop()
            self.stopping = False
            self.thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
            self.thread.start()

    async def _call(self, fn, *args, **kwargs):
        """Run fn on the engine thread between steps; its result (or exception) comes back here."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put((future, fn, args, kwargs))
        self.wakeup.set()
        return await asyncio.wrap_future(future)

    def _abort_on_engine_thread(self, request_id: str) -> bool:
        aborted = self.engine.abort(request_id)
        if aborted:
            out = RequestOutput(request_id, [], [], True, "abort", 0, 0, [])
            self._deliver([out])
        return aborted

    def _apply_commands(self) -> None:
        while True:
            try:
                future, fn, args, kwargs = self.commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting caller
                future.set_exception(e)

    def _run(self) -> None:
        while not self.stopping:
            self._apply_commands()
            if not self.engine.has_unfinished():
                self.wakeup.wait()
                self.wakeup.clear()
                continue
            self.busy_since = time.monotonic()
            try:
                outputs = self.engine.step()
            except BaseException as e:
                log.exception("engine step failed; failing every open request")
                self.dead = e
                self._fail_all(e)
                self._drain_commands(e)
                return
            finally:
                self.busy_since = None
            self._deliver(outputs)
            self._deliver_kv_events()
        self._drain_commands(EngineDeadError("the engine is shut down"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        try:
            self.loop.call_soon_threadsafe(self._dispatch, outputs)
        except RuntimeError:  # the event loop is gone: nobody can read these; free everything
            log.warning("event loop closed under a running engine; aborting its requests")
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
            self.stopping = True

    def _deliver_kv_events(self) -> None:
        events = self.engine.pool.drain_events()
        if not events:
            return
        stored = [k for kind, k in events if kind == "stored"]
        removed = [k for kind, k in events if kind == "removed"]
        try:
            self.loop.call_soon_threadsafe(self._dispatch_kv_events, stored, removed)
        except RuntimeError:  # the event loop is gone
            pass

    def _dispatch_kv_events(self, stored: list[BlockKey], removed: list[BlockKey]) -> None:
        for q in self.kv_subscribers:
            q.put_nowait(("delta", (stored, removed)))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:  # on the event loop
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            stream.queue.put_nowait(out)
            if out.finished:
                self.streams.pop(out.request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        def fail():
            for stream in self.streams.values():
                stream.queue.put_nowait(EngineDeadError(f"the engine failed: {error}"))
            self.streams.clear()

        try:
            self.loop.call_soon_threadsafe(fail)
        except RuntimeError:  # the event loop is gone; nobody is waiting
            pass

    def _drain_commands(self, error: BaseException) -> None:
        while True:
            try:
                future, *_ = self.commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
