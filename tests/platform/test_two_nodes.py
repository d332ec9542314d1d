"""`bind: node` on a real two-node Ray cluster (`ray start --head` and `ray start --address`, both on
this machine, told apart by a custom resource each): `tandem up --address` places the decode worker
on the second node and the other services on the first, every service binds and advertises the
node's IP (not loopback), and a chat through the gateway crosses the nodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from platform_helpers import client, start_platform, tandem, write_config

pytestmark = pytest.mark.slow
ENV = {"RAY_AUTH_MODE": "disabled"}  # the local cluster's own processes and ours agree
HEAD = "127.0.0.1:6391"
CONFIG = {
    "model": "smollm2-135m-instruct",
    "prefill_workers": 0,
    "decode_workers": 1,
    "bind": "node",
    "engine": {"kv_cache_mb": 64},
    "gateway": {"host": "0.0.0.0", "port": 0},
    "training": {"enabled": False},
    "resources": {
        **{
            role: {"num_cpus": 0.5, "custom": {"node-a": 1}}
            for role in ("tokenizer", "kvstore", "router", "gateway")
        },
        "decode": {"num_cpus": 1, "threads": 1, "custom": {"node-b": 1}},
    },
}


def ray(*args: str) -> None:
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    subprocess.run([ray_bin, *args], check=True, capture_output=True, timeout=120, env={**os.environ, **ENV})


@pytest.fixture(scope="module")
def cluster():
    ray("start", "--head", "--port", HEAD.split(":")[1], "--num-cpus", "3", "--resources", '{"node-a": 10}',
        "--include-dashboard", "false", "--disable-usage-stats")  # fmt: skip
    try:
        ray(
            "start",
            "--address",
            HEAD,
            "--num-cpus",
            "2",
            "--resources",
            '{"node-b": 10}',
            "--disable-usage-stats",
        )
        yield HEAD
    finally:
        ray("stop", "--force")


def test_services_bind_the_node_ip_and_serve_across_two_nodes(
    cluster, tmp_path, store_root, default_model_dir, monkeypatch
):
    import ray as ray_api

    cfg = write_config(tmp_path / "two-nodes.yaml", {**CONFIG, "model_store": str(store_root)})
    up = start_platform(cfg, env=ENV, args=("--address", cluster))
    try:
        monkeypatch.setenv("RAY_AUTH_MODE", ENV["RAY_AUTH_MODE"])  # for this process's ray.init
        ray_api.init(address=cluster, namespace="tandem", log_to_driver=False, configure_logging=False)
        try:
            node_ip = ray_api.util.get_node_ip_address()
            nodes = {n["NodeID"]: n["Resources"] for n in ray_api.nodes() if n["Alive"]}
            from ray._private import state  # (the GCS's table: no dashboard needed)

            placed = {a["Name"]: nodes[a["Address"]["NodeID"]] for a in state.actors().values()
                      if a["State"] == "ALIVE" and a["Name"]}  # fmt: skip
        finally:
            ray_api.shutdown()
        assert node_ip != "127.0.0.1"
        decode = next(resources for name, resources in placed.items() if name.startswith("tandem-decode"))
        assert "node-b" in decode and "node-a" in placed["tandem-router"]
        r = tandem("status", "--json", "--address", cluster, env=ENV)
        assert r.returncode == 0, r.stderr
        services = json.loads(r.stdout.strip().splitlines()[-1])["services"]
        assert {s["role"] for s in services} == {"tokenizer", "kvstore", "router", "decode", "gateway"}
        for s in services:  # reachable from other nodes: the node's IP, never loopback
            assert s["address"].startswith(node_ip + ":"), s
        assert up["url"].startswith(f"http://{node_ip}:")
        answer = client(up["url"]).chat.completions.create(
            model=CONFIG["model"],
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            temperature=0,
        )
        assert answer.usage.completion_tokens == 4
    finally:
        if up["proc"].poll() is None:
            tandem("down", "--address", cluster, env=ENV)
            up["proc"].wait(60)
        up["log"].close()
