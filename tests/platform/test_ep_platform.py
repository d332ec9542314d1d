"""An MoE model served by an expert-parallel decode group of 2 shard actors through the whole
platform, fed by a (whole-model) prefill worker through the KV store: the gateway's streamed answer
equals one unsharded engine's; a killed shard takes its group down and the launcher brings the whole
group back on the same address, so the next request succeeds; nothing is left behind."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

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

from services.platform.cli.main import main as tandem_main
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tests.prometheus_server import prometheus_binary, query, start_prometheus

pytestmark = pytest.mark.slow
MODEL = "smollm2-moe4-ep"
ROOT = Path(__file__).resolve().parents[2]
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


def test_grafana_dashboards_query_live_data_and_the_dashboard_page_fills(ep_platform, tmp_path):
    """Prometheus (discovering every service through the gateway's /dashboard/targets) scrapes the
    platform under a little load and one small fine-tuning job; every query of every Grafana
    dashboard parses and returns data. Then headless Chromium renders /dashboard: every panel is
    filled with live data, and a screenshot is kept."""
    if prometheus_binary() is None or chromium_binary() is None:
        pytest.skip("needs Debian's prometheus and chromium (make test installs them)")
    root = ep_platform["url"].removesuffix("/v1")
    api = client(ep_platform["url"])
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]  # fmt: skip
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = api.files.create(file=("sums.jsonl", data), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=f.id,
        extra_body={"tandem": {"max_steps": 3, "max_seq_len": 64, "lora": {"r": 4, "alpha": 8}}},
    )  # fmt: skip
    targets = httpx.get(root + "/dashboard/targets", timeout=30).json()
    roles = {t["labels"]["tandem_role"] for t in targets}
    assert roles == {"gateway", "tokenizer", "kvstore", "router", "controller", "prefill", "decode"}
    assert (
        len([t for t in targets if t["labels"]["tandem_role"] == "decode"]) == 2
    )  # both shards of the group
    prom, prom_url = start_prometheus(tmp_path, root + "/dashboard/targets")
    try:
        load = [ask(ep_platform["url"], max_tokens=8, stream=i % 2 == 0) for i in range(6)]
        long = "Summarise: " + " ".join(f"item {i} is {i * i};" for i in range(60))  # prefilled remotely
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=4)
        assert all(load)
        deadline = time.monotonic() + 240
        while api.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, "the fine-tuning job did not finish"
            ask(ep_platform["url"], max_tokens=4)  # keep the serving rates alive meanwhile
            time.sleep(1)
        assert api.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
        time.sleep(3)  # a few more scrapes
        up = query(prom_url, "up")["result"]
        assert len(up) == len(targets) and all(r["value"][1] == "1" for r in up), up
        empty = []
        for board in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
            for panel in json.loads(board.read_text())["panels"]:
                for target in panel["targets"]:
                    if not query(prom_url, target["expr"])["result"]:
                        empty.append(f"{board.name}: {panel['title']}: {target['expr']}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        prom.terminate()
        prom.wait(30)

    shot = tmp_path / "dashboard.png"
    dom = render_page(root + "/dashboard", shot)
    tiles = dict(re.findall(r'<div class="tile" data-k="(\w+)">.*?<div class="value">(.*?)</div>', dom, re.S))
    assert set(tiles) == {"tokens_per_s", "ttft", "itl", "requests_per_min", "kv_usage", "prefix_hit"}
    assert all(v and "–" not in v for v in tiles.values()), tiles
    assert float(tiles["tokens_per_s"]) > 0 and tiles["ttft"].endswith(("ms", " s"))
    topology = re.search(r'<table id="services">.*?</table>', dom, re.S).group(0)
    assert topology.count(">healthy<") == 7  # tokenizer, kvstore, router, controller, gateway, 2 workers
    assert 'class="heatmap"' in dom and dom.count('title="layer ') == 30 * 4  # a cell per layer and expert
    assert job.id in dom and '<svg width="260" height="70" class="loss"><polyline' in dom  # its loss curve
    assert shot.stat().st_size > 20_000
    print(f"dashboard screenshot: {shot}")

    # one request followed through the services' JSON log lines (Ray's session logs), by its id
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Once more. " + long}], "max_tokens": 3}
    trace = f"trace-{uuid.uuid4().hex[:12]}"
    r = httpx.post(
        ep_platform["url"] + "/chat/completions", json=body, headers={"X-Request-Id": trace}, timeout=120
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == trace
    time.sleep(1)  # Ray flushes the actors' stderr to their log files
    seen = set()
    # (every session: a training job's own local Ray may have started a newer one than the platform's)
    for path in Path("/tmp/ray").glob("session_2*/logs/worker-*.err"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{trace}' in line:
                entry = json.loads(line)
                seen.add((entry["service"], entry["logger"]))
    assert {("gateway", "tandem.gateway"), ("router", "tandem.router"), ("prefill", "tandem.worker"),
            ("decode", "tandem.worker")} <= seen, seen  # fmt: skip


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_page(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran for a few seconds in headless Chromium (and a screenshot)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--window-size=1400,1900", "--virtual-time-budget=6000"]  # fmt: skip
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium_binary(), *flags, f"--user-data-dir={profile}"]
        subprocess.run(
            [*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True
        )
        return subprocess.run(
            [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
        ).stdout


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
    assert f'tandem:service_up{{service="{group["name"]}",role="decode"}} 1' in metrics

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
