"""An MoE model served by an expert-parallel decode group of 2 shard actors through the whole
platform, fed by a (whole-model) prefill worker through the KV store: the gateway's streamed answer
equals one unsharded engine's; a killed shard takes its group down and the launcher brings the whole
group back on the same address, so the next request succeeds; nothing is left behind."""

from __future__ import annotations

import time

import httpx
import pytest
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

from shared.cli.main import main as tandem_main
from shared.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.slow
MODEL = "smollm2-moe4-ep"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def moe_model(store_root, default_model_dir):
    if not (store_root / MODEL).is_dir():
        assert tandem_main(["models", "--store", str(store_root), "upcycle", "smollm2-135m-instruct",
                            "--experts", "4", "--top-k", "2", "--noise", "0.05", "--name", MODEL]) == 0  # fmt: skip
    return store_root / MODEL


@pytest.fixture(scope="module")
def ep_platform(tmp_path_factory, store_root, moe_model):
    cfg = {
        "model": MODEL,
        "model_store": str(store_root),
        "prefill_workers": 1,
        "decode_workers": 1,
        "ep_size": 2,
        "engine": {"kv_cache_mb": 64},
        "router": {"health_interval": 0.5, "disagg_threshold": 0},
        "kvstore": {"memory_mb": 256},
        "gateway": {"port": 0},
        "resources": {"decode": {"num_cpus": 1, "threads": 1}, "prefill": {"num_cpus": 0.5, "threads": 1}},
    }
    up = start_platform(write_config(tmp_path_factory.mktemp("deploy") / "ep.yaml", cfg))
    yield up
    stop_platform(up)


def ask(url, max_tokens=16, stream=True) -> str:
    c = client(url)
    if stream:
        chunks = c.chat.completions.create(
            model=MODEL, messages=CHAT, temperature=0, max_tokens=max_tokens, stream=True
        )
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return (
        c.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=max_tokens)
        .choices[0]
        .message.content
    )


def test_group_answers_like_one_engine_and_survives_a_killed_shard(ep_platform, moe_model):
    engine = LLMEngine.from_store(
        moe_model, EngineConfig(kv_cache_bytes=64 * 2**20, enable_prefix_caching=False)
    )
    want = engine.generate(
        [engine.tokenizer.encode_chat(CHAT)], SamplingParams(max_tokens=16, temperature=0)
    )[0]
    del engine
    assert ask(ep_platform["url"]) == want.text  # prefilled on the prefill worker, decoded by the group
    s = status()
    group = next(x for x in s["services"] if x["role"] == "decode")
    assert group["shards"] == 2 and group["healthy"]
    counts = group["expert_tokens"]  # per layer, per expert, summed over the shards
    assert len(counts) == 30 and all(len(layer) == 4 for layer in counts)
    assert all(sum(layer) == sum(counts[0]) > 0 for layer in counts)  # every token routed in every layer
    assert group["expert_imbalance"] >= 1.0
    # the gateway's operator dashboard shows the same counts (heatmap page + JSON + Prometheus)
    root = ep_platform["url"].removesuffix("/v1")
    page = httpx.get(root + "/dashboard")
    assert page.status_code == 200 and "heatmap" in page.text
    board = httpx.get(root + "/dashboard/status", timeout=30).json()
    shown = next(x for x in board["services"] if x["name"] == group["name"])
    assert sum(map(sum, shown["expert_tokens"])) >= sum(map(sum, counts))
    metrics = httpx.get(root + "/metrics", timeout=30).text
    assert f'tandem_expert_tokens_total{{name="{group["name"]}",layer="29",expert="3"}}' in metrics
    assert f'tandem_service_up{{name="{group["name"]}",role="decode"}} 1' in metrics

    import ray

    ray.init(address="auto", namespace="tandem", log_to_driver=False, configure_logging=False)
    try:
        pids = ray.get(ray.get_actor("controller").pids.remote())
        ray.kill(ray.get_actor(f"tandem-{group['name']}-shard1"), no_restart=False)  # a shard crashes
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 180
    while status()["restarts"] <= s["restarts"] and time.monotonic() < deadline:
        time.sleep(0.5)
    after = status()
    assert after["restarts"] > s["restarts"]
    assert next(x for x in after["services"] if x["name"] == group["name"])["address"] == group["address"]
    time.sleep(1.5)  # the router's next health round sees the group back
    assert ask(ep_platform["url"], stream=False) == want.text

    r = tandem("down", timeout=240)
    assert r.returncode == 0
    assert ep_platform["proc"].wait(120) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (alive(list(pids.values())) or ray_processes()):
        time.sleep(0.5)
    assert not alive(list(pids.values())) and not ray_processes()
