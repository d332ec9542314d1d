"""Disaggregated prefill/decode through the KV store, and prefix-aware routing — real gRPC servers,
a real redis-server: the disaggregated tokens equal a monolithic engine's; a prefix computed on one
prefill worker is fetched from the store (then from Redis, then after a store restart) by another,
which computes only the suffix; the router follows KV events to the worker holding a prefix and
spreads under load; cancellation and uncollected leases leave every pool and the store clean."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis

from services.kvstore.server import start_server as start_store
from services.router.server import ROUTE_HEADER
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.kvstore import KVStore
from shared.rpc.convert import params_to_proto
from shared.tokenizer import Tokenizer
from tandem.v1 import common_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow
KV = dict(kv_cache_bytes=64 * 2**20, long_prefill_chunk=64)  # long prompts prefill in chunks
THRESHOLD = 48  # uncached prompt tokens above which the router prefills remotely


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def system_prompt(tok):
    text = "You are the help desk of the Tandem museum. " + " ".join(
        f"Room {i} shows {'paintings' if i % 2 else 'sculptures'} from century {10 + i}." for i in range(24)
    )
    return text


def chat(tok, system: str, question: str) -> list[int]:
    return tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": question}])


@pytest.fixture(scope="module")
def kvstore(loop, redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    kv = KVStore(256 * 2**20, redis_url)
    server = loop.run(start_store(kv))
    state = {"kv": kv, "server": server}
    yield state
    loop.run(state["server"].stop())


@pytest.fixture(scope="module")
def cluster(platform, kvstore, default_model_dir):
    """Two prefill workers (the second with a 2 s lease TTL), one decode worker, a prefix-aware router."""
    address = kvstore["server"].address
    prefill = [
        platform.start_worker(default_model_dir, dict(role="prefill", kvstore=address, lease_ttl=ttl), **KV)
        for ttl in (60.0, 2.0)
    ]
    decode = platform.start_worker(default_model_dir, dict(role="decode", kvstore=address), **KV)
    server, router = platform.start_router(
        [w[0].address for w in [*prefill, decode]],
        policy="prefix_aware",
        kvstore=address,
        disagg_threshold=THRESHOLD,
    )
    channel = grpc.insecure_channel(server.address)
    yield {
        "prefill": prefill,
        "decode": decode,
        "router": router,
        "stub": router_pb2_grpc.RouterStub(channel),
    }
    channel.close()


@pytest.fixture(scope="module")
def reference(default_model_dir):
    return LLMEngine.from_store(default_model_dir, EngineConfig(**KV))


def monolithic(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    """(tokens, text, logprobs) of one request run alone on a monolithic engine."""
    engine.add_request("ref", prompt, params)
    tokens, text, logprobs = [], "", []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.new_text
            logprobs += out.new_logprobs
    return tokens, text, logprobs


def request(rid, prompt, **kw):
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **kw})
    return common_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params))


def run(stub, req):
    """(route header, chunks) of one router call."""
    call = stub.Generate(req)
    route = dict(call.initial_metadata()).get(ROUTE_HEADER, "")
    return route, list(call)


def load(server) -> worker_pb2.LoadReport:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.address)).GetLoad(worker_pb2.LoadRequest())


def all_idle(idle, cluster) -> bool:
    return all(idle(service) for _, service in [*cluster["prefill"], cluster["decode"]])


def test_disaggregated_output_equals_monolithic(idle, cluster, kvstore, reference, tok, system_prompt):
    stub = cluster["stub"]
    short = tok.encode("Hi")
    long = chat(tok, system_prompt, "Which room shows sculptures from century 20?")
    assert len(short) < THRESHOLD < len(long) and len(long) > 4 * KV["long_prefill_chunk"]
    cases = [  # each with its own cache salt, so its prefix is not cached anywhere yet
        ("short", short, {}),
        ("long", long, {}),
        ("logprobs", long, dict(logprobs=2, max_tokens=6)),
        ("seeded", long, dict(temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.2)),
        ("cached", long, dict(cache_salt="long")),  # "long" left its blocks in the store: prefill locally
    ]
    for name, prompt, kw in cases:
        kw = {"cache_salt": name, **kw}
        tokens, text, logprobs = monolithic(
            reference, prompt, SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **kw})
        )
        route, chunks = run(stub, request(name, prompt, **kw))
        remote = name not in ("short", "cached")
        assert ("prefill=127.0.0.1" in route) == remote, route
        assert [t for c in chunks for t in c.token_ids] == tokens, name
        assert "".join(c.text for c in chunks) == text
        if remote:  # the first token came from a prefill worker, the rest from the decode worker
            assert chunks[0].worker in {w[0].address for w in cluster["prefill"]}
            assert chunks[-1].worker == cluster["decode"][0].address
        if name == "cached":
            assert chunks[-1].usage.cached_tokens == len(prompt) // 16 * 16
        got = [(lp.token_id, [t.token_id for t in lp.top]) for c in chunks for lp in c.logprobs]
        assert got == [(lp.token_id, [t for t, _ in lp.top]) for lp in logprobs]
        got = [lp.logprob for c in chunks for lp in c.logprobs]
        assert got == pytest.approx([lp.logprob for lp in logprobs], abs=1e-4)
        last = chunks[-1]
        assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == len(tokens)

    # concurrent long requests with different questions: each equals its monolithic run
    prompts = [chat(tok, system_prompt, f"What is in room {i}?") for i in (3, 8, 15)]
    wants = reference.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    results: dict[int, list[int]] = {}

    def one(i):
        _, chunks = run(stub, request(f"c{i}", prompts[i], cache_salt=f"concurrent-{i}"))
        results[i] = [t for c in chunks for t in c.token_ids]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(3)] == [w.output_token_ids for w in wants]
    assert all_idle(idle, cluster)
    assert kvstore["kv"].pinned == 0  # every decode released its lease on import


def test_a_prefix_is_fetched_from_the_store_then_redis_then_after_a_restart(
    loop, idle, cluster, kvstore, redis_url, tok, system_prompt
):
    (p1, _), (p2, _) = cluster["prefill"]
    s1 = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(p1.address))
    s2 = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(p2.address))
    salt = f"tenant-{time.monotonic_ns()}"  # a prefix nobody computed yet

    def prefill(stub, rid, question):
        prompt = chat(tok, system_prompt, question)
        req = request(rid, prompt, cache_salt=salt, max_tokens=4)
        req.prefill_only = True
        last = list(stub.Generate(req))[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_HANDOFF
        assert kvstore["kv"].release(last.kv_handle.lease_id)  # no decode comes: let go of the blocks
        return prompt, last

    first, out = prefill(s1, "pf1", "Where are the paintings?")
    assert out.usage.cached_tokens == 0 and len(out.kv_handle.block_keys) == len(first) // 16
    shared_blocks = len(chat(tok, system_prompt, "")) // 16 - 1  # full blocks both prompts share

    def second(server, stub, rid, question):
        before = load(server)
        prompt, out = prefill(stub, rid, question)
        after = load(server)
        cached = out.usage.cached_tokens
        assert cached >= shared_blocks * 16 and cached % 16 == 0
        assert after.store_fetched_blocks - before.store_fetched_blocks == cached // 16
        assert (
            after.prompt_tokens_computed - before.prompt_tokens_computed == len(prompt) - cached
        )  # only the suffix
        return cached

    # another prefill worker finds the prefix in the store's memory tier
    second(p2, s2, "pf2", "Where are the sculptures?")
    # memory tier cleared (and the workers' own caches): it comes from Redis
    kvstore["kv"].clear_memory()
    for _, service in cluster["prefill"]:
        loop.run(service.engine.call(service.engine.engine.pool.reset_cache))
    hits = kvstore["kv"].stats()["redis_hits"]
    second(p1, s1, "pf3", "Which room is first?")
    assert kvstore["kv"].stats()["redis_hits"] > hits
    # a store restarted on the same Redis (same address) still serves it
    address = kvstore["server"].address
    port = int(address.rsplit(":", 1)[1])
    loop.run(kvstore["server"].stop())
    kvstore["kv"] = KVStore(256 * 2**20, redis_url)
    kvstore["server"] = loop.run(start_store(kvstore["kv"], port=port))
    for _, service in cluster["prefill"]:
        loop.run(service.engine.call(service.engine.engine.pool.reset_cache))
    second(p2, s2, "pf4", "Which room is last?")
    assert kvstore["kv"].stats()["redis_hits"] > 0
    assert all_idle(idle, cluster)


def test_cancel_frees_blocks_everywhere_and_uncollected_leases_expire(
    idle, cluster, kvstore, tok, system_prompt
):
    stub = cluster["stub"]
    prompt = chat(tok, system_prompt, "Tell me about every room, slowly.")
    # cancelled during decode
    call = stub.Generate(request("cx1", prompt, max_tokens=1000, ignore_eos=True))
    next(call), next(call), next(call)
    call.cancel()
    # cancelled during prefill (before the first token)
    call = stub.Generate(request("cx2", chat(tok, system_prompt, "A brand new question?"), max_tokens=50))
    time.sleep(0.3)
    call.cancel()
    # aborted by id while decoding
    call = stub.Generate(request("cx3", prompt, max_tokens=1000, ignore_eos=True))
    next(call), next(call)
    assert stub.Abort(common_pb2.AbortRequest(request_id="cx3")).aborted
    assert list(call)[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert all_idle(idle, cluster)
    deadline = time.monotonic() + 5
    while kvstore["kv"].pinned and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kvstore["kv"].pinned == 0

    # a handoff nobody collects: its lease (2 s TTL on this worker) expires
    p2, _ = cluster["prefill"][1]
    s2 = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(p2.address))
    req = common_pb2.GenerateRequest(
        request_id="orphan", prompt_token_ids=prompt, prefill_only=True,
        params=params_to_proto(SamplingParams(max_tokens=5, temperature=0.0)),
    )  # fmt: skip
    assert list(s2.Generate(req))[-1].kv_handle.lease_id
    assert kvstore["kv"].pinned > 0
    time.sleep(2.5)
    assert kvstore["kv"].pinned == 0 and kvstore["kv"].stats()["leases"] == 0
    assert all_idle(idle, cluster)


@pytest.fixture(scope="module")
def cramped(loop, platform, default_model_dir):
    """A prefill and a decode worker on a KV store whose memory holds two blocks and has no Redis."""
    kv = KVStore(2 * 2**20)
    store = loop.run(start_store(kv))
    prefill, prefill_service = platform.start_worker(
        default_model_dir, dict(role="prefill", kvstore=store.address), **KV
    )
    decode, decode_service = platform.start_worker(
        default_model_dir, dict(role="decode", kvstore=store.address), **KV
    )
    server, router = platform.start_router(
        [prefill.address, decode.address], kvstore=store.address, disagg_threshold=THRESHOLD
    )
    yield {"kv": kv, "prefill": prefill_service, "decode": decode_service, "router": router,
           "stub": router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))}  # fmt: skip
    loop.run(store.stop())


def test_handoffs_that_the_store_cannot_hold_or_the_decode_cannot_take_still_answer_right(
    idle, cramped, reference, tok, system_prompt
):
    """Handoff faults, each answered with the monolithic engine's tokens: (1) the store evicts most of
    a handoff's blocks at once (lease pins only what it holds, the rest goes inline); (2) the inline
    part would be over the gRPC message cap (the decode worker prefills instead); (3) the decode cannot
    import the handle after the first token went out (the rest is generated as a continuation)."""
    stub, metrics = cramped["stub"], cramped["router"].metrics
    prompt = chat(tok, system_prompt, "Which rooms show paintings?")
    want = reference.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].output_token_ids

    def ask(name):
        route, chunks = run(stub, request(name, prompt, cache_salt=name))
        assert [t for c in chunks for t in c.token_ids] == want, name
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
            len(prompt),
            len(want),
        )
        return route, chunks

    route, chunks = ask("evicted")
    assert "prefill=127.0.0.1" in route and chunks[0].worker != chunks[-1].worker  # a real handoff
    assert metrics.handoff_fallbacks._value.get() == 0  # the decode took it: no block it needed was gone

    cramped["prefill"].kv.max_inline_bytes = 2**20
    try:
        ask("too-large")
    finally:
        cramped["prefill"].kv.max_inline_bytes = 60 * 2**20
    assert metrics.prefill_fallbacks._value.get() == 1

    decode = cramped["decode"]

    async def lost(handle):  # as when the store lost the blocks between the prefill and the decode
        decode.kv._import = real_import
        raise grpc.aio.AioRpcError(grpc.StatusCode.FAILED_PRECONDITION, None, None, "block gone")

    real_import = decode.kv._import
    decode.kv._import = lost
    route, chunks = ask("lost")
    assert decode.kv._import == real_import and metrics.handoff_fallbacks._value.get() == 1
    assert all(idle(w) for w in (cramped["prefill"], decode)) and cramped["kv"].pinned == 0


def test_prefix_aware_routing_follows_kv_events_and_spreads_under_load(
    platform, idle, default_model_dir, tok, system_prompt
):
    workers = [platform.start_worker(default_model_dir, **KV) for _ in range(2)]
    server, router = platform.start_router(
        [w[0].address for w in workers], policy="prefix_aware", balance_threshold=1
    )
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    prompts = [chat(tok, system_prompt, f"Question number {i}?") for i in range(4)]
    route, chunks = run(stub, request("pa0", prompts[0], max_tokens=2))
    holder = chunks[0].worker
    handle = next(w for w in router.workers if w.address == holder)
    deadline = time.monotonic() + 5
    while not handle.cached and time.monotonic() < deadline:  # KV events reach the router
        time.sleep(0.05)
    assert handle.match(router.pool.block_keys(prompts[1], "")) >= 10
    for i in (1, 2, 3):  # shared prefix: the same worker, which computes only the suffix
        route, chunks = run(stub, request(f"pa{i}", prompts[i], max_tokens=2))
        assert chunks[0].worker == holder and f"decode={holder}" in route
        assert chunks[-1].usage.cached_tokens >= 10 * 16
    # load on the holder above the threshold: requests with the same prefix spread
    calls = [
        stub.Generate(request(f"busy{i}", prompts[i], max_tokens=1000, ignore_eos=True)) for i in range(4)
    ]
    served = {next(c).worker for c in calls}
    assert served == {w[0].address for w in workers}
    for c in calls:
        c.cancel()
    assert all(idle(w[1]) for w in workers)
