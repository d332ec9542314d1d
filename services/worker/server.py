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
  prefill_only   prefill, sample the first token, and end with FINISH_REASON_HANDOFF and a KVHandle
                 (kv_connector.py publishes and leases the blocks)
  kv_handle      import the handle's KV (kv_connector.py) and decode on from the first token
Any request, on any worker with a store, takes the longest prefix the store has beyond the local
cache, so only the rest is computed. KVEvents streams the prefix cache's changes to routers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from services.worker.kv_connector import MAX_INLINE_BYTES, HandoffTooLarge, KVConnector
from shared.engine import AsyncLLMEngine, EngineDeadError, RequestOutput
from shared.engine.kv_transfer import KVHandoff
from shared.rpc.convert import FINISH_REASONS, logprob_to_proto, params_from_proto
from shared.store import ModelStore, StoreError
from shared.telemetry.metrics import EngineMetrics, Snapshot
from shared.telemetry.moe import moe_metrics
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("tandem.worker")
SERVICE_NAME = "tandem.v1.Worker"
ROLES = ("monolithic", "prefill", "decode")


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
        self.kv = KVConnector(engine, kvstore, lease_ttl, max_inline_bytes)
        self.watchdog_s = watchdog_s  # one engine step longer than this: the worker reports itself down
        self.models = models  # where LoRA fine-tunes of this model are found (multi-LoRA serving)
        self.closing = asyncio.Event()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, model, role, engine.load)
        self.registry.register(Snapshot(lambda: self.kv.metrics(model, role)))
        self.registry.register(Snapshot(lambda: moe_metrics(engine.engine.model)))

    async def close(self) -> None:
        """Stop the engine and let go of the store (after the server drained)."""
        await self.engine.shutdown()
        await self.kv.close()

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
                    await self.kv.release(chunk.kv_handle.lease_id)
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
                handoff = await self.kv.import_handle(handle)
                stream = await self.engine.add_request(
                    request_id, prompt, params, kv_handoff=handoff, lora=lora
                )
            else:
                prefix = await self.kv.fetch_prefix(prompt, params.cache_salt, lora)
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
        try:
            chunk.kv_handle.CopyFrom(await self.kv.publish(handoff))
        except HandoffTooLarge as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

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
            **self.kv.counters,
            **self.kv.timers,
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
