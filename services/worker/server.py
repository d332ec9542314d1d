"""The worker service: the engine behind gRPC.

    tandem serve worker --model smollm2-135m-instruct [--role prefill|decode|monolithic]
                        [--kvstore HOST:PORT] [--port P] [--max-num-seqs N] ...

Generate streams TokenChunks as the engine produces them (token ids, the text that became final,
logprobs; finish reason and usage on the last). A caller that goes away (cancels, disconnects,
passes its deadline) aborts the request at once and frees its KV blocks. Status codes: a bad
parameter or an over-long prompt INVALID_ARGUMENT (the message names it), another model NOT_FOUND,
a duplicate request id ALREADY_EXISTS, a full queue RESOURCE_EXHAUSTED, a failed engine UNAVAILABLE,
a KV handle whose blocks cannot be had FAILED_PRECONDITION, a handoff too large to send inline (no
store, or a full one) RESOURCE_EXHAUSTED (the router then prefills on the decode worker).

Disaggregation (the router decides; the role only tells it how to use this worker):
  prefill_only   prefill (reusing prefix blocks from the local cache or the KV store), sample the
                 first token, publish the prompt's new full blocks to the store, lease them for the
                 decode, and end with FINISH_REASON_HANDOFF and a KVHandle (the keys of the blocks
                 the store pinned + the rest of the KV inline; without a store everything is inline)
  kv_handle      import the handle's blocks (the local prefix cache first, then the store, then the
                 inline tail), release the lease, and decode on from the first token
Any request, on any worker with a store, takes the longest prefix the store has beyond the local
cache, so only the rest is computed. KVEvents streams the prefix cache's changes to routers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry

from shared.engine import AsyncLLMEngine, EngineDeadError, RequestOutput
from shared.engine.kv_transfer import KVHandoff, from_wire, to_wire
from shared.kvstore.client import KVStoreClient
from shared.rpc.convert import FINISH_REASONS, logprob_from_proto, logprob_to_proto, params_from_proto
from shared.rpc.security import MAX_MESSAGE_BYTES
from shared.store import ModelStore, StoreError
from shared.telemetry.metrics import EngineMetrics, Snapshot, family
from shared.telemetry.moe import moe_metrics
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tandem.worker")
SERVICE_NAME = "tandem.v1.Worker"
ROLES = ("monolithic", "prefill", "decode")
#: the most KV a handoff carries inline (what the store could not take), below the gRPC message cap
MAX_INLINE_BYTES = MAX_MESSAGE_BYTES - 4 * 2**20


class HandoffTooLarge(Exception):
    """A handoff whose inline part would not fit in one gRPC message."""


def chunk_from_output(out: RequestOutput) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(
        request_id=out.request_id,
        token_ids=out.new_token_ids,
        text=out.new_text,
        logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
        finish_reason=FINISH_REASONS.get(out.finish_reason, common_pb2.FINISH_REASON_UNSPECIFIED),
    )
    if isinstance(out.stop_reason, str):
        chunk.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        chunk.stop_token_id = out.stop_reason
    if out.finished:
        chunk.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=len(out.output_token_ids),
                cached_tokens=out.num_cached_tokens,
            )
        )
    return chunk


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        engine: AsyncLLMEngine,
        model: str,
        worker_id: str | None = None,
        role: str = "monolithic",
        max_waiting: int = 256,
        kvstore: str | None = None,
        lease_ttl: float = 60.0,
        max_inline_bytes: int = MAX_INLINE_BYTES,
        watchdog_s: float = 300.0,
        models: ModelStore | None = None,
        registry: CollectorRegistry | None = None,
    ):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got '{role}'")
        self.engine = engine
        self.model = model
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.role = role
        self.max_waiting = max_waiting
        self.store = KVStoreClient(kvstore) if kvstore else None
        self.lease_ttl = lease_ttl
        self.max_inline_bytes = max_inline_bytes
        self.watchdog_s = watchdog_s  # one engine step longer than this: the worker reports itself down
        self.models = models  # where LoRA fine-tunes of this model are found (multi-LoRA serving)
        self.counters = {"store_fetched_blocks": 0, "store_published_blocks": 0}
        self.timers = {"kv_publish_seconds": 0.0, "kv_import_seconds": 0.0, "kv_fetch_seconds": 0.0}
        self.closing = asyncio.Event()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, model, role, engine.load)
        self.registry.register(Snapshot(self._transfer_metrics))
        self.registry.register(Snapshot(lambda: moe_metrics(engine.engine.model)))

    def _transfer_metrics(self):
        """KV moved between this worker and the store (disaggregation and shared prefixes)."""
        labels = [self.model, self.role]
        blocks = family("counter", "kv_transfer_blocks", "KV blocks moved to or from the KV store.",
                        ["model_name", "role", "direction"])  # fmt: skip
        blocks.add_metric([*labels, "fetched"], self.counters["store_fetched_blocks"])
        blocks.add_metric([*labels, "published"], self.counters["store_published_blocks"])
        seconds = family("counter", "kv_transfer_seconds", "Time spent moving KV, by operation.",
                         ["model_name", "role", "op"])  # fmt: skip
        for op in ("publish", "import", "fetch"):
            seconds.add_metric([*labels, op], self.timers[f"kv_{op}_seconds"])
        return [blocks, seconds]

    async def close(self) -> None:
        """Stop the engine and let go of the store (after the server drained)."""
        await self.engine.shutdown()
        if self.store is not None:
            await self.store.close()

    # -- generation -------------------------------------------------------------------------------

    async def _adapter(self, name: str, context) -> str:
        """A LoRA fine-tune of this worker's model, loaded into the engine (requests for it share
        batches with the base's); NOT_FOUND for any other model."""
        try:
            info = self.models.get(name) if self.models is not None else None
        except StoreError:
            info = None
        if info is None or info.base_model != self.model:
            if name in self.engine.engine.loras:  # removed from the store since: unload it (when idle)
                try:
                    await self.engine.call(self.engine.engine.remove_lora, name)
                except ValueError:
                    pass
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{name}' is not served here")
        try:
            await self.engine.add_lora(name, self.models.path(name))
        except ValueError as e:
            busy = "slots are in use" in str(e)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if busy else grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, f"model '{name}': {e}")
        return name

    async def Generate(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        stream = await self._start(request_id, request, context)
        self.metrics.arrived(request_id)
        log.info(
            "request %s: %d prompt tokens, role %s", request_id, len(request.prompt_token_ids), self.role
        )
        try:
            async for out in stream:
                self.metrics.output(out)
                if out.finished:
                    log.info("request %s finished: %s, %d tokens", request_id, out.finish_reason,
                             len(out.output_token_ids))  # fmt: skip
                chunk = chunk_from_output(out)
                if out.kv_handoff is None:
                    yield chunk
                    continue
                await self._attach_handle(chunk, out.kv_handoff, context)
                try:
                    yield chunk
                except BaseException:  # nobody will collect it: unpin now, not at the TTL
                    await self._release(chunk.kv_handle.lease_id)
                    raise
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self.metrics.finished(request_id, "abort")  # a no-op unless the caller left early
            await stream.aclose()  # the caller left early: abort and free the blocks

    async def _start(self, request_id: str, request, context):
        """Admit the request (or abort the call with the status that says why) and add it to the
        engine: from a KV handle (import, then unpin), or with the prefix the store holds."""
        lora = None
        if request.model and request.model != self.model:
            lora = await self._adapter(request.model, context)
        if request_id in self.engine.streams:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id '{request_id}' is already running"
            )
        if len(self.engine.engine.scheduler.waiting) >= self.max_waiting:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the worker's queue is full; retry later")
        if request.prefill_only and request.HasField("kv_handle"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a request is either prefill_only or carries a kv_handle"
            )
        params = params_from_proto(request.params)
        prompt = list(request.prompt_token_ids)
        handle = request.kv_handle if request.HasField("kv_handle") else None
        try:
            if handle is not None:
                t0 = time.perf_counter()
                try:
                    handoff = await self._import(handle)
                    self.timers["kv_import_seconds"] += time.perf_counter() - t0
                finally:
                    await self._release(handle.lease_id)  # the blocks are copied (or lost): unpin
                stream = await self.engine.add_request(
                    request_id, prompt, params, kv_handoff=handoff, lora=lora
                )
            else:
                t0 = time.perf_counter()
                prefix = await self._fetch_prefix(prompt, params.cache_salt, lora)
                self.timers["kv_fetch_seconds"] += time.perf_counter() - t0
                stream = await self.engine.add_request(
                    request_id, prompt, params, prefill_only=request.prefill_only, prefix_kv=prefix, lora=lora
                )
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except grpc.aio.AioRpcError as e:  # the store failed a handle's blocks
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot import the KV handle's blocks: {e.details()}"
            )
        return stream

    async def _attach_handle(self, chunk: common_pb2.TokenChunk, handoff: KVHandoff, context) -> None:
        """Publish a prefill's KV and put its handle on the chunk; a handoff too large to send inline
        aborts the call with RESOURCE_EXHAUSTED (the router then prefills on the decode worker)."""
        t0 = time.perf_counter()
        try:
            chunk.kv_handle.CopyFrom(await self._publish(handoff))
        except HandoffTooLarge as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        self.timers["kv_publish_seconds"] += time.perf_counter() - t0

    async def _fetch_prefix(
        self, prompt: list[int], cache_salt: str | None, lora: str | None = None
    ) -> torch.Tensor | None:
        """The KV of the prompt's longest prefix the store has beyond what this engine caches (with
        the cached part copied in front), or None when the local cache does as well."""
        eng = self.engine.engine
        if self.store is None or not eng.config.enable_prefix_caching:
            return None
        keys = eng.prompt_keys(prompt, cache_salt, lora)[: (len(prompt) - 1) // eng.config.block_size]
        local = eng.cached_prefix_len(keys)
        try:
            _, anywhere = await self.store.lookup(keys)
            if anywhere <= local:
                return None
            have = await self.engine.call(eng.read_cached, keys[:local])
            fetched = await self.store.get_blocks(keys[have.shape[0] : anywhere], eng.layout)
        except grpc.aio.AioRpcError as e:  # the store is down or lost a block: compute it here
            log.warning("KV store prefix fetch failed (%s); computing the prompt locally", e.code().name)
            return None
        self.counters["store_fetched_blocks"] += fetched.shape[0]
        return torch.cat([have, fetched.to(have.dtype)])

    async def _publish(self, handoff: KVHandoff) -> common_pb2.KVHandle:
        """Put the prompt's new full blocks in the store, lease them, and describe the handoff."""
        keys = list(handoff.block_keys)
        lease_id = ""
        if self.store is not None and keys:
            layout = self.engine.engine.layout
            try:
                _, present = await self.store.lookup(keys)
                if present < len(keys):
                    stored = await self.store.put_blocks(
                        keys[present:], handoff.payload[present : len(keys)], layout
                    )
                    self.counters["store_published_blocks"] += stored
                lease_id, pinned = await self.store.lease(keys, self.lease_ttl)
                keys = keys[:pinned]  # blocks the store could not pin (evicted already) travel inline
            except grpc.aio.AioRpcError as e:  # hand everything over inline instead
                log.warning("KV store publish failed (%s); handing the KV over inline", e.code().name)
                keys, lease_id = [], ""
        else:
            keys = []
        tail = handoff.payload[len(keys) :]
        inline_bytes = tail.numel() * tail.element_size()
        if inline_bytes > self.max_inline_bytes:
            await self._release(lease_id)
            raise HandoffTooLarge(
                f"the KV handoff would send {inline_bytes / 2**20:.1f} MiB inline (limit "
                f"{self.max_inline_bytes / 2**20:.0f} MiB: the KV store is missing or full); prefill it on the "
                "decode worker"
            )
        dtype, shape, data = to_wire(tail)
        handle = common_pb2.KVHandle(
            layout=handoff.layout,
            num_tokens=handoff.num_tokens,
            block_keys=keys,
            inline_dtype=dtype,
            inline_shape=shape,
            inline_kv=data,
            first_token=handoff.first_token,
            rng_state=handoff.rng_state.numpy().tobytes(),
            lease_id=lease_id,
            num_cached_tokens=handoff.num_cached_tokens,
        )
        if handoff.first_logprob is not None:
            handle.first_logprob.CopyFrom(logprob_to_proto(handoff.first_logprob))
        return handle

    async def _import(self, handle: common_pb2.KVHandle) -> KVHandoff:
        eng = self.engine.engine
        if handle.layout != eng.layout:
            raise ValueError(f"KV handle has layout '{handle.layout}', this worker uses '{eng.layout}'")
        keys = list(handle.block_keys)
        inline = from_wire(handle.inline_dtype, tuple(handle.inline_shape), handle.inline_kv)
        parts = []
        if keys:
            have = await self.engine.call(eng.read_cached, keys)
            parts.append(have)
            if have.shape[0] < len(keys):
                if self.store is None:
                    raise ValueError("the KV handle names store blocks but this worker has no --kvstore")
                fetched = await self.store.get_blocks(keys[have.shape[0] :], eng.layout)
                self.counters["store_fetched_blocks"] += fetched.shape[0]
                parts.append(fetched)
        parts.append(inline)
        payload = torch.cat([p.to(inline.dtype) for p in parts]) if len(parts) > 1 else inline
        rng = torch.frombuffer(bytearray(handle.rng_state), dtype=torch.uint8) if handle.rng_state else None
        if rng is None:
            raise ValueError("the KV handle has no rng_state")
        return KVHandoff(
            num_tokens=handle.num_tokens,
            payload=payload,
            block_keys=tuple(keys),
            first_token=handle.first_token,
            first_logprob=logprob_from_proto(handle.first_logprob)
            if handle.HasField("first_logprob")
            else None,
            rng_state=rng,
            layout=handle.layout,
            num_cached_tokens=handle.num_cached_tokens,
        )

    async def _release(self, lease_id: str) -> None:
        if self.store is None or not lease_id:
            return
        try:
            await self.store.release(lease_id)
        except grpc.aio.AioRpcError as e:  # it expires on its own
            log.warning("could not release KV lease %s: %s", lease_id, e.code().name)

    # -- control ----------------------------------------------------------------------------------

    async def Abort(self, request, context):
        return common_pb2.AbortResponse(aborted=await self.engine.abort(request.request_id))

    def stalled(self) -> bool:
        """The watchdog: True while the engine has spent over `watchdog_s` in a single step."""
        return self.engine.stalled_for() > self.watchdog_s

    async def GetLoad(self, request, context):
        if self.engine.dead is not None:  # the router's health check marks this worker down
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine failed: {self.engine.dead}")
        if self.stalled():
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the engine is stuck in one step for {self.engine.stalled_for():.0f} s")  # fmt: skip
        load = self.engine.load()
        eng = self.engine.engine
        return worker_pb2.LoadReport(
            worker_id=self.worker_id,
            role=self.role,
            model=self.model,
            running=load["running"],
            waiting=load["waiting"],
            kv_blocks_total=load["kv_blocks_total"],
            kv_blocks_free=load["kv_blocks_free"],
            kv_usage=load["kv_usage"],
            prefix_cache_hit_blocks=load["prefix_cache_hit_blocks"],
            num_preemptions=load["num_preemptions"],
            max_model_len=eng.max_model_len,
            kv_layout=eng.layout,
            block_size=eng.config.block_size,
            prompt_tokens_computed=load["prompt_tokens_computed"],
            **self.counters,
            **self.timers,
        )

    async def KVEvents(self, request, context):
        events = await self.engine.subscribe_kv_events()
        closing = asyncio.ensure_future(self.closing.wait())
        get = None
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    return
                kind, data = get.result()
                if kind == "reset":
                    yield worker_pb2.KVEventBatch(worker_id=self.worker_id, reset=True, stored=data)
                else:
                    stored, removed = data
                    yield worker_pb2.KVEventBatch(worker_id=self.worker_id, stored=stored, removed=removed)
        finally:
            closing.cancel()
            if get is not None:
                get.cancel()
            self.engine.unsubscribe_kv_events(events)


def register(server, engine: AsyncLLMEngine, model: str, **kwargs) -> WorkerService:
    service = WorkerService(engine, model, registry=server.registry, **kwargs)
    server.add(worker_pb2_grpc.add_WorkerServicer_to_server, service, SERVICE_NAME)
    server.on_drain_start.append(service.closing.set)
    return service


async def start_server(
    model_dir,
    model: str,
    config=None,
    host: str = "127.0.0.1",
    port: int = 0,
    engine=None,
    metrics_port: int | None = 0,
    **kwargs,
):
    """A started worker server running an AsyncLLMEngine for the model in `model_dir` (or for the
    given, already built LLMEngine — e.g. the leader of an expert-parallel group).
    Returns (GrpcServer, WorkerService); stop with `await server.stop(service.close)`."""
    from shared.engine import EngineConfig, LLMEngine
    from shared.rpc.server import GrpcServer

    engine = AsyncLLMEngine(
        engine or LLMEngine.from_store(model_dir, config or EngineConfig(), model_id=model)
    )
    server = GrpcServer("worker", host, port, metrics_port=metrics_port)
    if model_dir is not None:
        kwargs.setdefault("models", ModelStore(Path(model_dir).parent))
    service = register(server, engine, model, **kwargs)
    await server.start()
    return server, service
