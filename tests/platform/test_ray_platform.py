"""The whole platform on a local Ray, as `tandem up` runs it (a small test config): the OpenAI SDK
gets the engine's answer, streamed, with the internal gRPC plane behind a token; `tandem status` shows every role healthy; a killed decode
worker's actor is restarted by Ray and the next request succeeds; `tandem scale` works both ways
under traffic without a failed request; `tandem down` leaves no Ray or service process behind. Bad
configs fail fast, naming the field."""

from __future__ import annotations

import threading
import time

import grpc
import openai
import pytest
import yaml
from platform_helpers import (
    alive,
    client,
    ray_processes,
    start_platform,
    status,
    stop_platform,
    tandem,
    write_config,
)

from services.platform.cli.main import main
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tandem.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Name three colours."}]
CONFIG = {
    "model": "smollm2-135m-instruct",
    "prefill_workers": 1,
    "decode_workers": 1,
    "engine": {"kv_cache_mb": 64},
    "router": {"disagg_threshold": 16, "health_interval": 0.5},
    "kvstore": {"memory_mb": 256},
    "gateway": {"port": 0},
    "resources": {"prefill": {"num_cpus": 1, "threads": 1}, "decode": {"num_cpus": 1, "threads": 1}},
}


@pytest.fixture(scope="module")
def platform_up(tmp_path_factory, store_root, default_model_dir):
    cfg_file = write_config(
        tmp_path_factory.mktemp("deploy") / "test.yaml", {**CONFIG, "model_store": str(store_root)}
    )
    up = start_platform(cfg_file, env={"TANDEM_INTERNAL_TOKEN": "platform-test-token"})  # gRPC plane closed
    yield up
    stop_platform(up)


def test_streamed_chat_through_the_platform_equals_the_engine(platform_up, default_model_dir):
    engine = LLMEngine.from_store(default_model_dir, EngineConfig(kv_cache_bytes=64 * 2**20))
    want = engine.generate(
        [engine.tokenizer.encode_chat(CHAT)], SamplingParams(max_tokens=24, temperature=0)
    )[0]
    stream = client(platform_up["url"]).chat.completions.create(
        model=CONFIG["model"], messages=CHAT, temperature=0, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    s = status()
    assert s["state"] == "up" and s["counts"] == {"prefill": 1, "decode": 1, "monolithic": 0}
    roles = {x["role"] for x in s["services"]}
    assert roles == {"tokenizer", "kvstore", "router", "controller", "gateway", "prefill", "decode"}
    assert all(x["healthy"] and x["address"] for x in s["services"])
    # every service ran behind the internal token; a caller without it is refused
    router = next(x["address"] for x in s["services"] if x["role"] == "router")
    with pytest.raises(grpc.RpcError) as e:
        router_pb2_grpc.RouterStub(grpc.insecure_channel(router)).ListWorkers(
            router_pb2.ListWorkersRequest(), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # the training-job controller is wired to the gateway: OpenAI's fine-tuning API answers
    api = client(platform_up["url"])
    assert api.fine_tuning.jobs.list().object == "list"
    with pytest.raises(openai.BadRequestError, match="x.jsonl:1: not valid JSON"):
        api.files.create(file=("x.jsonl", b"{oops\n"), purpose="fine-tune")


def test_a_killed_decode_worker_is_restarted_and_serves_again(platform_up):
    import ray

    ray.init(address="auto", namespace="tandem", log_to_driver=False, configure_logging=False)
    try:
        name = next(x["name"] for x in status()["services"] if x["role"] == "decode")
        before = status()["restarts"]
        ray.kill(ray.get_actor(f"tandem-{name}"), no_restart=False)  # as if the process crashed
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 120
    while status()["restarts"] <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status()["restarts"] > before
    time.sleep(1.5)  # the router's next health round sees it back
    resp = client(platform_up["url"]).chat.completions.create(
        model=CONFIG["model"], messages=CHAT, temperature=0, max_tokens=8
    )
    assert resp.choices[0].message.content
    assert all(x["healthy"] for x in status()["services"])


def test_scale_both_ways_under_traffic_without_a_failed_request(platform_up):
    c = client(platform_up["url"])
    failures, done = [], []
    stop = threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            try:
                r = c.chat.completions.create(
                    model=CONFIG["model"], messages=[{"role": "user", "content": f"Count to {i}."}],
                    temperature=0, max_tokens=6,
                )  # fmt: skip
                done.append(r.choices[0].finish_reason)
            except Exception as e:  # noqa: BLE001 - every failure is the test's business
                failures.append(repr(e))
            i += 1

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        up = tandem("scale", "decode=2", timeout=180)
        assert up.returncode == 0, up.stderr
        assert status()["counts"]["decode"] == 2
        time.sleep(2)
        down = tandem("scale", "decode=1", timeout=180)
        assert down.returncode == 0, down.stderr
        assert status()["counts"]["decode"] == 1
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures and len(done) >= 4
    bad = tandem("scale", "decode=0", "monolithic=0")
    assert bad.returncode == 1 and "at least one decode or monolithic worker" in bad.stderr


def test_a_restarted_router_serves_the_workers_scaled_in_since_it_started(platform_up):
    """The router starts with the worker list of `tandem up`; after a scale and a crash, Ray restarts
    it with that first list, and the platform hands it today's."""
    import ray

    assert tandem("scale", "decode=2", timeout=180).returncode == 0
    ray.init(address="auto", namespace="tandem", log_to_driver=False, configure_logging=False)
    try:
        before = status()["restarts"]
        ray.kill(ray.get_actor("tandem-router"), no_restart=False)
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 120
    while status()["restarts"] <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    router = next(x for x in status()["services"] if x["role"] == "router")
    assert len(router["load"]["workers"]) == 3  # the prefill worker and both decode workers
    r = client(platform_up["url"]).chat.completions.create(
        model=CONFIG["model"], messages=CHAT, temperature=0, max_tokens=4
    )
    assert r.choices[0].finish_reason == "length"
    assert tandem("scale", "decode=1", timeout=180).returncode == 0


def test_down_leaves_no_process_behind(platform_up):
    import ray

    ray.init(address="auto", namespace="tandem", log_to_driver=False, configure_logging=False)
    try:
        pids = list(ray.get(ray.get_actor("controller").pids.remote()).values())
    finally:
        ray.shutdown()
    r = tandem("down", timeout=240)
    assert r.returncode == 0 and "down" in r.stdout
    assert platform_up["proc"].wait(120) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (alive(pids) or ray_processes()):
        time.sleep(0.5)
    assert not alive(pids) and not ray_processes()
    assert tandem("status").returncode == 1


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"resources": {"tokeniser": {"num_cpus": 1}}}, "resources.tokeniser: unknown role"),
        ({"decode_workers": -1}, "decode_workers: Input should be greater than or equal to 0"),
        ({"kvstore": {"redis_url": "redis://127.0.0.1:1/0"}}, "kvstore.redis_url: cannot reach Redis"),
        ({"model": "no-such-model"}, "model: 'no-such-model' is not in the model store"),
        ({"router": {"policy": "random"}}, "router.policy: Input should be 'round_robin'"),
        ({"prefil_workers": 1}, "prefil_workers: unknown field"),
        ({"ep_size": 0}, "ep_size: Input should be greater than or equal to 1"),
        ({"engine": {"speculative": "draft"}}, "engine: speculative 'draft' needs engine.draft_model"),
        ({"engine": {"draft_model": "no-draft"}}, "engine.draft_model: 'no-draft' is not in the model store"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(tmp_path, store_root, capsys, patch, field):
    cfg = {**CONFIG, "model_store": str(store_root), **patch}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    assert main(["up", "--config", str(path)]) == 1
    assert field in capsys.readouterr().err
    assert time.monotonic() - start < 10  # before any Ray is started
