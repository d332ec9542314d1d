"""The worker and router services behind real gRPC servers: the streamed tokens equal the engine's,
callers that leave or abort free the worker's KV blocks, bad requests get status codes, and the router
spreads requests, forwards aborts and retries a worker that fails before the first token."""

from __future__ import annotations

import grpc
import pytest

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.rpc.convert import params_to_proto
from shared.tokenizer import Tokenizer
from tandem.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow
KV = dict(kv_cache_bytes=64 * 2**20)


@pytest.fixture(scope="module")
def prompt(default_model_dir):
    return Tokenizer.from_dir(default_model_dir).encode_chat(
        [{"role": "user", "content": "Tell me a story."}]
    )


@pytest.fixture(scope="module")
def workers(platform, default_model_dir):
    return [platform.start_worker(default_model_dir, **KV) for _ in range(2)]


@pytest.fixture(scope="module")
def router(platform, workers):
    server, service = platform.start_router([w[0].address for w in workers], policy="round_robin")
    channel = grpc.insecure_channel(server.address)
    yield router_pb2_grpc.RouterStub(channel), service
    channel.close()


def request(rid, prompt, **kw):
    params = SamplingParams(**{"max_tokens": 16, "temperature": 0.0, **kw})
    return common_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params))


def test_worker_streams_the_engines_tokens(idle, workers, prompt, default_model_dir):
    server, service = workers[0]
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.address))
    chunks = list(stub.Generate(request("w1", prompt, max_tokens=24, logprobs=1)))
    want = LLMEngine.from_store(default_model_dir, EngineConfig(**KV)).generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0.0)
    )[0]
    assert [t for c in chunks for t in c.token_ids] == want.output_token_ids
    assert "".join(c.text for c in chunks) == want.text
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 24)
    load = stub.GetLoad(worker_pb2.LoadRequest())
    assert load.role == "monolithic" and load.kv_blocks_total > 0
    assert load.max_model_len == load.kv_blocks_total * 16  # clamped to what the small cache holds
    assert idle(service)


def test_worker_frees_blocks_when_the_caller_leaves_or_aborts(idle, workers, prompt):
    server, service = workers[0]
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.address))
    call = stub.Generate(request("w2", prompt, max_tokens=1000, ignore_eos=True))
    next(call)
    call.cancel()  # the caller goes away mid-stream
    assert idle(service)
    call = stub.Generate(request("w3", prompt, max_tokens=1000, ignore_eos=True))
    next(call)
    assert stub.Abort(common_pb2.AbortRequest(request_id="w3")).aborted
    rest = list(call)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert not stub.Abort(common_pb2.AbortRequest(request_id="w3")).aborted
    assert idle(service)


def test_worker_rejects_bad_requests_with_status_codes(idle, workers, prompt):
    server, service = workers[0]
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.address))
    cases = [
        (request("b1", prompt, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (request("b2", prompt, max_tokens=9000), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
        (request("b3", []), grpc.StatusCode.INVALID_ARGUMENT, "at least one token"),
        (common_pb2.GenerateRequest(request_id="b4", model="other", prompt_token_ids=prompt),
         grpc.StatusCode.NOT_FOUND, "other"),
    ]  # fmt: skip
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req))
        assert e.value.code() == code and text in e.value.details()
    long = stub.Generate(request("dup", prompt, max_tokens=1000, ignore_eos=True))
    next(long)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request("dup", prompt)))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    long.cancel()
    assert idle(service)


def test_router_spreads_forwards_and_aborts(idle, router, workers, prompt):
    stub, service = router
    served = []
    for i in range(4):
        chunks = list(stub.Generate(request(f"r{i}", prompt)))
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        served.append(chunks[0].worker)
    addresses = [w[0].address for w in workers]
    assert set(served) == set(addresses) and served[0] != served[1]  # round robin
    listed = stub.ListWorkers(router_pb2.ListWorkersRequest()).workers
    assert [w.address for w in listed] == addresses and all(w.healthy for w in listed)
    call = stub.Generate(request("ra", prompt, max_tokens=1000, ignore_eos=True))
    next(call)
    assert stub.Abort(common_pb2.AbortRequest(request_id="ra")).aborted
    assert list(call)[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    call = stub.Generate(request("rc", prompt, max_tokens=1000, ignore_eos=True))
    next(call)
    call.cancel()  # a caller leaving the router reaches the worker too
    assert all(idle(w[1]) for w in workers)


def test_router_retries_a_worker_that_fails_before_the_first_token(
    idle, platform, loop, default_model_dir, prompt
):
    (a, a_service), (b, b_service) = [platform.start_worker(default_model_dir, **KV) for _ in range(2)]
    server, service = platform.start_router(
        [a.address, b.address], policy="round_robin", health_interval=3600
    )
    assert all(w.healthy for w in service.workers)
    loop.run(b.stop(b_service.close))  # the router still believes b is up
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    for i in range(2):  # one of the two picks b first
        chunks = list(stub.Generate(request(f"x{i}", prompt)))
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and chunks[0].worker == a.address
    assert not service.workers[1].healthy
    assert idle(a_service)


def test_shutdown_drains_in_flight_streams(platform, loop, default_model_dir, prompt):
    server, service = platform.start_worker(default_model_dir, **KV)
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.address))
    call = stub.Generate(request("drain", prompt, max_tokens=40, ignore_eos=True))
    next(call)
    stopping = __import__("asyncio").run_coroutine_threadsafe(
        server.stop(service.close), loop.loop
    )  # SIGTERM does exactly this
    rest = list(call)  # the in-flight stream still completes
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == 40
    stopping.result(30)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request("late", prompt)))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_watchdog_reports_a_worker_stuck_in_a_step_and_the_router_avoids_it(
    idle, workers, router, prompt
):
    """An engine step that does not return (a hung kernel or device) turns the worker's GetLoad into
    UNAVAILABLE once it passes `watchdog_s`, so the router's health check takes it out, and the actor
    is restarted under `tandem up`; when the step returns the worker reports normally again."""
    import threading
    import time

    (server, service), (other, _) = workers
    stub, router_service = router
    release = threading.Event()
    step = service.engine.engine.step

    def hung_step():
        release.wait(30)
        service.engine.engine.step = step
        return step()

    service.watchdog_s = 0.5
    service.engine.engine.step = hung_step
    worker = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.address))
    call = worker.Generate(request("stuck", prompt, max_tokens=4))
    try:
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as e:
            worker.GetLoad(worker_pb2.LoadRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "stuck in one step" in e.value.details()
        time.sleep(1.5)  # the router's next health round
        assert [w.healthy for w in router_service.workers if w.address == server.address] == [False]
        for i in range(2):  # round robin, but only the healthy worker serves
            chunks = list(stub.Generate(request(f"around{i}", prompt, max_tokens=2)))
            assert chunks[-1].worker == other.address
    finally:
        release.set()
        service.watchdog_s = 300.0
    assert list(call)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert worker.GetLoad(worker_pb2.LoadRequest(), timeout=10).worker_id
    assert idle(service)
