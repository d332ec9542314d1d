"""The worker service: the engine behind gRPC. Role "monolithic": it prefills and decodes itself.

    tandem serve worker --model smollm2-135m-instruct [--port P] [--max-num-seqs N] ...

Generate streams TokenChunks as the engine produces them (token ids, the text that became final,
logprobs; finish reason and usage on the last). A caller that goes away (cancels, disconnects,
passes its deadline) aborts the request at once and frees its KV blocks. Status codes: a bad
parameter or an over-long prompt INVALID_ARGUMENT (the message names it), another model NOT_FOUND,
a duplicate request id ALREADY_EXISTS, a full queue RESOURCE_EXHAUSTED, a failed engine UNAVAILABLE.
"""

from __future__ import annotations

import uuid

import grpc

from shared.engine import AsyncLLMEngine, EngineDeadError, RequestOutput
from shared.rpc.convert import FINISH_REASONS, logprob_to_proto, params_from_proto
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

SERVICE_NAME = "tandem.v1.Worker"


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
    ):
        self.engine = engine
        self.model = model
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.role = role
        self.max_waiting = max_waiting

    async def Generate(self, request, context):
        if request.model and request.model != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.model}' is not served here")
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.engine.streams:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id '{request_id}' is already running"
            )
        if len(self.engine.engine.scheduler.waiting) >= self.max_waiting:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the worker's queue is full; retry later")
        params = params_from_proto(request.params)
        try:
            stream = await self.engine.add_request(request_id, list(request.prompt_token_ids), params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        try:
            async for out in stream:
                yield chunk_from_output(out)
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            await stream.aclose()  # the caller left early: abort and free the blocks

    async def Abort(self, request, context):
        return common_pb2.AbortResponse(aborted=await self.engine.abort(request.request_id))

    async def GetLoad(self, request, context):
        load = self.engine.load()
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
            max_model_len=self.engine.engine.max_model_len,
        )


def register(server, engine: AsyncLLMEngine, model: str, **kwargs) -> WorkerService:
    service = WorkerService(engine, model, **kwargs)
    server.add(worker_pb2_grpc.add_WorkerServicer_to_server, service, SERVICE_NAME)
    return service


async def start_server(model_dir, model: str, config=None, host: str = "127.0.0.1", port: int = 0, **kwargs):
    """A started worker server running an AsyncLLMEngine for the model in `model_dir`.
    Returns (GrpcServer, WorkerService); stop with `await server.stop(service.engine.shutdown)`."""
    from shared.engine import EngineConfig, LLMEngine
    from shared.rpc.server import GrpcServer

    engine = AsyncLLMEngine(LLMEngine.from_store(model_dir, config or EngineConfig(), model_id=model))
    server = GrpcServer("worker", host, port)
    service = register(server, engine, model, **kwargs)
    await server.start()
    return server, service
