"""End to end: tokenizer + worker + router + gateway as real servers, the official `openai` SDK as the
client. Text equals what the engine produces directly; streams concatenate to the non-streamed text;
n, seeds, logprobs and usage behave as OpenAI's do; every bad input gets its status and error JSON
and leaves nothing running; a client that disconnects frees the worker; 32 concurrent streams."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from services.gateway.protocol import Limits
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.store import DEFAULT_MODEL

pytestmark = pytest.mark.slow
MODEL = DEFAULT_MODEL
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(platform, store, default_model_dir):
    tokenizer = platform.start_tokenizer(store)
    worker, worker_service = platform.start_worker(default_model_dir)
    router, _ = platform.start_router([worker.address])
    url = platform.start_gateway(tokenizer.address, router.address, limits=Limits(route_header=True))
    return {"url": url, "worker": worker_service, "tokenizer": tokenizer.address, "router": router.address,
            "worker_metrics": worker.metrics_address, "tokenizer_metrics": tokenizer.metrics_address,
            "router_metrics": router.metrics_address}  # fmt: skip


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return LLMEngine.from_store(default_model_dir, EngineConfig())


def test_chat_matches_the_engine_streamed_or_not(idle, client, engine, stack):
    want = engine.generate(
        [engine.tokenizer.encode_chat(CHAT)], SamplingParams(max_tokens=32, temperature=0)
    )[0]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=32)
    choice = resp.choices[0]
    assert choice.message.content == want.text and choice.message.role == "assistant"
    assert choice.finish_reason == want.finish_reason
    prompt_len = len(engine.tokenizer.encode_chat(CHAT))
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.usage.completion_tokens == len(want.output_token_ids)
    assert resp.usage.total_tokens == prompt_len + len(want.output_token_ids)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.output_token_ids)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt ran just before
    # the router's decision comes back as a header (a debugging opt-in), streamed or not
    for stream in (False, True):
        r = httpx.post(
            stack["url"] + "/v1/chat/completions",
            json={"model": MODEL, "messages": CHAT, "max_tokens": 2, "stream": stream},
            timeout=60,
        )
        route = r.headers["x-tandem-route"]
        assert r.status_code == 200 and route.startswith("policy=") and "decode=127.0.0.1:" in route
        assert "cached_tokens=" in route and int(route.rsplit("=", 1)[1]) > 0  # the router saw the prefix
    assert idle(stack["worker"])


QUOTE = [
    {
        "role": "user",
        "content": "Repeat exactly: the quick brown fox jumps over the lazy dog, "
        "and the lazy dog sleeps under the old oak tree by the river.",
    }
]


def test_speculative_extra_keeps_greedy_text_and_counts_acceptance(client, engine, stack):
    """`speculative: ngram` (prompt lookup) per request: the same greedy text as the engine without
    speculation, streamed or not; the worker's metrics count the drafts it accepted."""
    want = engine.generate(
        [engine.tokenizer.encode_chat(QUOTE)], SamplingParams(max_tokens=40, temperature=0)
    )[0]
    extra = {"speculative": "ngram", "speculative_tokens": 5}
    resp = client.chat.completions.create(model=MODEL, messages=QUOTE, temperature=0, max_tokens=40,
                                          extra_body=extra)  # fmt: skip
    assert resp.choices[0].message.content == want.text
    assert resp.usage.completion_tokens == len(want.output_token_ids)
    stream = client.chat.completions.create(model=MODEL, messages=QUOTE, temperature=0, max_tokens=40,
                                            stream=True, extra_body=extra)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    worker = samples(httpx.get(f"http://{stack['worker_metrics']}/metrics").text)
    labels = (("method", "ngram"), ("model_name", MODEL), ("role", "monolithic"))
    assert worker[("tandem:spec_decode_num_drafts_total", labels)] >= 2
    drafted = worker[("tandem:spec_decode_num_draft_tokens_total", labels)]
    assert 0 < worker[("tandem:spec_decode_num_accepted_tokens_total", labels)] <= drafted


def test_completions_match_the_engine_streamed_or_not(client, engine):
    prompt = "The three primary colours are"
    want = engine.generate([engine.tokenizer.encode(prompt)], SamplingParams(max_tokens=20, temperature=0))[0]
    resp = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    assert resp.choices[0].text == want.text and resp.usage.completion_tokens == 20
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == want.text
    ids = engine.tokenizer.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=20)
    assert by_ids.choices[0].text == want.text
    two = client.completions.create(model=MODEL, prompt=[prompt, "Hello"], temperature=0, max_tokens=5)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == want.text[
        : len(two.choices[0].text)
    ]


def test_n_with_a_seed_is_reproducible(client):
    kw = dict(model=MODEL, messages=CHAT, n=2, seed=42, temperature=1.0, max_tokens=16)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1] and texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]
    stream = client.chat.completions.create(**kw, stream=True)
    got = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
    assert [got[0], got[1]] == texts


def test_logprobs_are_present_and_consistent(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token  # greedy: the argmax
        assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-6 and item.logprob <= 0
    assert (
        "".join(i.token for i in content[:-1])
        == resp.choices[0].message.content[: len("".join(i.token for i in content[:-1]))]
    )
    comp = client.completions.create(model=MODEL, prompt="One, two,", temperature=0, max_tokens=6, logprobs=2)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.token_logprobs) == 6
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


BAD = [
    ({"model": "nope", "messages": CHAT}, 404, "model", "model_not_found"),
    ({"model": MODEL, "messages": CHAT, "temperature": -1}, 400, "temperature", None),
    ({"model": MODEL, "messages": CHAT, "top_p": 0}, 400, "top_p", None),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 9000}, 400, "messages", "context_length_exceeded"),
    ({"model": MODEL, "messages": CHAT, "n": 0}, 400, "n", None),
    ({"model": MODEL, "messages": []}, 400, "messages", None),
    ({"messages": CHAT}, 400, "model", None),
    ({"model": MODEL, "messages": CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    ({"model": MODEL, "messages": CHAT, "logit_bias": {"999999": 1}}, 400, "logit_bias", None),
    ({"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
    ({"model": MODEL, "messages": CHAT, "speculative": "fast"}, 400, "speculative", None),
    ({"model": MODEL, "messages": CHAT, "speculative": "draft"}, 400, "speculative", None),  # no draft model
    ({"model": MODEL, "messages": CHAT, "speculative_tokens": 99}, 400, "speculative_tokens", None),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{b[2]}-{b[1]}" for b in BAD])
def test_bad_chat_requests(idle, stack, body, status, param, code):
    r = httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert err["code"] == code
    assert idle(stack["worker"])


def test_other_bad_inputs(idle, stack):
    url = stack["url"]
    r = httpx.post(
        url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 50})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": ""})
    assert r.status_code == 400
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert idle(stack["worker"])


def test_request_id_tokenize_detokenize_health_models_docs(stack, engine):
    url = stack["url"]
    r = httpx.get(url + "/v1/models", headers={"X-Request-Id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1" and r.json()["data"][0]["id"] == MODEL
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.json()["tokens"] == engine.tokenizer.encode("Hello world") and r.json()["count"] == 2
    r = httpx.post(url + "/tokenize", json={"messages": CHAT})
    assert r.json()["tokens"] == engine.tokenizer.encode_chat(CHAT)
    r = httpx.post(url + "/detokenize", json={"tokens": engine.tokenizer.encode("Hello world")})
    assert r.json()["prompt"] == "Hello world"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert httpx.get(url + "/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(url + "/openapi.json").json()["paths"]


def test_client_disconnect_aborts_the_request(idle, stack):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                break
    assert idle(stack["worker"])
    # non-streaming too
    try:
        httpx.post(stack["url"] + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
    except httpx.TimeoutException:
        pass
    assert idle(stack["worker"])


def test_32_concurrent_streams(idle, client, engine, stack):
    prompts = [[{"role": "user", "content": f"Write the number {i} in words."}] for i in range(32)]
    want = engine.generate(
        [engine.tokenizer.encode_chat(p) for p in prompts], SamplingParams(max_tokens=16, temperature=0)
    )

    def run(messages):
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=16, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, prompts))
    assert got == [w.text for w in want]
    assert idle(stack["worker"])


def test_stop_and_max_completion_tokens(client, engine):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=32)
    text = full.choices[0].message.content
    stop = text.split()[3]
    resp = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=32, stop=[stop]
    )
    choice = resp.choices[0]
    assert choice.message.content == text[: text.index(stop)] and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=3)
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"


def test_full_queue_is_429(platform, stack, default_model_dir):
    worker, _ = platform.start_worker(
        default_model_dir, service_kwargs={"max_waiting": 0}, kv_cache_bytes=2**25
    )
    router, _ = platform.start_router([worker.address])
    url = platform.start_gateway(stack["tokenizer"], router.address)
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT}, timeout=30)
    assert r.status_code == 429 and "queue" in r.json()["error"]["message"]


def test_no_worker_is_503_and_api_keys_are_checked(platform, stack):
    router, _ = platform.start_router(["127.0.0.1:1"])
    url = platform.start_gateway(stack["tokenizer"], router.address)
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert httpx.get(url + "/health").status_code == 503
    url = platform.start_gateway(stack["tokenizer"], stack["router"], api_keys=["sekret"])
    assert httpx.get(url + "/v1/models").status_code == 401
    ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert ok.models.list().data[0].id == MODEL
    assert json.loads(httpx.get(url + "/v1/models").text)["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/metrics").status_code == 401  # operator data is behind the keys too
    assert httpx.get(url + "/dashboard").status_code == 200  # the page is static; it asks for a key
    board = httpx.get(url + "/dashboard/status", headers={"Authorization": "Bearer sekret"}).json()
    assert board["state"] == "standalone gateway"


def test_dashboard_and_metrics_of_a_standalone_gateway(stack, client):
    url = stack["url"]
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True).close()
    list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, stream=True))
    page = httpx.get(url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    board = httpx.get(url + "/dashboard/status").json()
    (worker,) = board["services"]
    assert worker["healthy"] and worker["role"] == "monolithic" and worker["load"]["kv_blocks_total"] > 0
    assert board["serving"]["tokens_per_s"] > 0 and board["serving"]["ttft_p50_s"] > 0
    metrics = httpx.get(url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    gateway = samples(metrics.text)
    assert gateway[("tandem:service_up", (("role", "monolithic"), ("service", worker["address"])))] == 1
    model = (("model_name", MODEL),)
    assert gateway[("tandem:gateway_time_to_first_token_seconds_count", model)] >= 2
    assert gateway[("tandem:gateway_generation_tokens_total", model)] >= 6
    route = (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200"))
    assert gateway[("tandem:gateway_http_requests_total", route)] >= 2


def samples(text: str) -> dict:
    """{(name, sorted labels): value} of a Prometheus text exposition (which must parse)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_service_serves_prometheus_metrics_with_vllm_names(stack, client):
    """The worker's engine metrics keep vLLM's names (tandem: prefix) and meanings; the tokenizer and
    router count their gRPC calls; each serves them on the metrics port it announces."""
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    worker = samples(httpx.get(f"http://{stack['worker_metrics']}/metrics").text)
    labels = (("model_name", MODEL), ("role", "monolithic"))
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert ("tandem:" + gauge, labels) in worker
    assert worker[("tandem:num_requests_running", labels)] == 0  # nothing in flight now
    assert worker[("tandem:generation_tokens_total", labels)] >= out.usage.completion_tokens
    assert worker[("tandem:prompt_tokens_total", labels)] >= out.usage.prompt_tokens
    assert (
        worker[("tandem:prefix_cache_queries_total", labels)]
        >= worker[("tandem:prefix_cache_hits_total", labels)]
    )
    assert worker[("tandem:prefix_cache_hits_total", labels)] > 0  # the same chat prompt, asked many times
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):  # fmt: skip
        assert worker[(f"tandem:{h}_count", labels)] > 0
    finished = {k[1]: v for k, v in worker.items() if k[0] == "tandem:request_success_total"}
    assert finished[(("finished_reason", "length"), *labels)] >= 1
    assert sum(finished.values()) == worker[("tandem:e2e_request_latency_seconds_count", labels)]
    rpc = (("grpc_code", "OK"), ("grpc_method", "Generate"), ("grpc_service", "tandem.v1.Worker"))
    assert worker[("tandem:grpc_server_handled_total", rpc)] >= 1
    tokenizer = samples(httpx.get(f"http://{stack['tokenizer_metrics']}/metrics").text)
    tok = (("grpc_code", "OK"), ("grpc_method", "Tokenize"), ("grpc_service", "tandem.v1.Tokenizer"))
    assert tokenizer[("tandem:grpc_server_handled_total", tok)] >= 1
    router = samples(httpx.get(f"http://{stack['router_metrics']}/metrics").text)
    assert router[("tandem:router_decisions_total", (("policy", "prefix_aware"), ("prefill", "local")))] >= 1
    assert router[("tandem:router_workers", (("healthy", "true"), ("role", "monolithic")))] == 1


def test_one_request_is_followed_through_every_service_by_its_id(stack):
    """JSON log lines of the gateway, the router and the worker all carry the client's X-Request-Id
    (sent on as gRPC metadata), so one grep follows the request from gateway to decode."""
    import io
    import logging

    from shared.telemetry.logs import JsonFormatter, RequestIdFilter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 3}
        r = httpx.post(stack["url"] + "/v1/chat/completions", json=body, headers={"X-Request-Id": "trace-42"})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    traced = [x for x in lines if x.get("request_id", "").startswith("trace-42")]
    assert {"tandem.gateway", "tandem.router", "tandem.worker"} <= {x["logger"] for x in traced}, lines
    assert any(
        x["logger"] == "tandem.worker" and "finished: length, 3 tokens" in x["message"] for x in traced
    )
    assert all({"ts", "level", "service", "logger", "message"} <= set(x) for x in lines)
