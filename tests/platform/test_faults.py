"""Fault injection on real processes: every service a `tandem serve` process (Redis, KV store,
tokenizer, two prefill and two decode workers, router, gateway), each fault a SIGKILL or a stop, every
request made with the OpenAI SDK or plain HTTP through the gateway:

  - a decode worker killed unseen: the request that meets it after its first token is continued on
    another decode worker, and the answer is unchanged;
  - a prefill worker killed unseen: the request that meets it is prefilled by its decode worker;
  - Redis stopped: the KV store keeps serving from memory and reports itself degraded;
  - the last decode worker killed mid-stream: the client gets an error event that says so, and the
    requests after it are served by the prefill worker;
  - the KV store stopped: workers go on without the remote cache;
and afterwards every surviving worker is idle with its KV pool whole. (A controller restarted
mid-job is tests/services/test_fine_tuning_e2e.py.)"""

from __future__ import annotations

import json
import signal

import grpc
import httpx
import openai
import pytest

from shared.store import DEFAULT_MODEL as MODEL
from tandem.v1 import kvstore_pb2, kvstore_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.bench.common import Processes
from tests.redis_server import start_redis

pytestmark = pytest.mark.slow
SYSTEM = "You answer questions about the Tandem museum. " + " ".join(
    f"Room {i} shows {'paintings' if i % 2 else 'sculptures'} from century {10 + i}." for i in range(12)
)
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does room 5 show?"}]


@pytest.fixture(scope="module")
def platform(tmp_path_factory, store_root, default_model_dir):
    redis_proc, redis_url = start_redis(tmp_path_factory.mktemp("redis"))
    procs = Processes(threads=1)
    store = ("--store", str(store_root), "--kv-cache-mb", "96")
    try:
        kv = procs.start("kvstore", "--memory-mb", "256", "--redis", redis_url)
        tokenizer = procs.start("tokenizer", "--store", str(store_root))
        workers = {}
        for role in ("prefill", "prefill", "decode", "decode"):
            address = procs.start("worker", *store, "--role", role, "--kvstore", kv)
            workers[address] = (role, procs.procs[-1])
        # health checks rare: the router meets each fault on a request, as it would between two polls;
        # round robin: of two requests, one meets the dead worker
        router = procs.start("router", *[a for w in workers for a in ("--worker", w)], "--kvstore", kv,
                             "--policy", "round_robin", "--disagg-threshold", "32", "--health-interval", "3600")  # fmt: skip
        gateway = procs.start("gateway", "--tokenizer", tokenizer, "--router", router, "--route-header")
        yield {"url": f"http://{gateway}", "kv": kv, "kv_proc": procs.procs[0], "workers": workers,
               "redis": redis_proc, "logs": procs.dir}  # fmt: skip
    finally:
        procs.down()
        redis_proc.kill()


def sdk(platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform["url"] + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(platform, n: int = 2) -> list[str]:
    """n answers, each under a new cache salt: no prefix is cached, so each is prefilled remotely
    while a prefill worker lives."""
    answers = []
    for _ in range(n):
        platform["asked"] += 1
        out = sdk(platform).chat.completions.create(
            model=MODEL, messages=CHAT, temperature=0, max_tokens=8,
            extra_body={"cache_salt": f"ask-{platform['asked']}"},
        )  # fmt: skip
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
        answers.append(out.choices[0].message.content)
    return answers


def kill(platform, role: str) -> str:
    address = next(a for a, (r, _) in platform["workers"].items() if r == role)
    proc = platform["workers"].pop(address)[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return address


def router_log(platform) -> str:
    return "".join(p.read_text() for p in platform["logs"].glob("router-*.log"))


def test_faults_on_real_processes(platform):
    platform["asked"] = 0
    (want,) = ask(platform, 1)  # greedy: every answer after a fault must be this one

    # a decode worker dies unseen: the request that meets it after its first token is continued
    kill(platform, "decode")
    assert ask(platform) == [want, want]
    assert "failed after the first token (UNAVAILABLE); continuing on" in router_log(platform)

    # a prefill worker dies unseen: the request that meets it is prefilled by its decode worker
    kill(platform, "prefill")
    assert ask(platform) == [want, want]
    assert "failed (UNAVAILABLE); prefilling on the decode worker" in router_log(platform)

    # Redis stopped: the store serves from memory and says it is degraded
    platform["redis"].kill()
    platform["redis"].wait(10)
    assert ask(platform) == [want, want]
    stats = kvstore_pb2_grpc.KVStoreStub(grpc.insecure_channel(platform["kv"])).Stats(
        kvstore_pb2.StoreStatsRequest(), timeout=10
    )
    assert stats.degraded and stats.redis_errors > 0 and stats.memory_blocks > 0
    assert stats.pinned_blocks == 0  # every handoff's lease was released

    # the last decode worker killed mid-stream: the client gets an error event that says so
    body = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", platform["url"] + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(6):  # a few tokens in
            next(x for x in lines if x.startswith("data: "))
        kill(platform, "decode")
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    error = events[-1]["error"]["message"]
    assert "the worker serving this request failed after" in error and "retry the request" in error
    assert ask(platform) == [want, want]  # the prefill worker left decodes too

    # the KV store stopped: workers go on without the remote cache
    platform["kv_proc"].send_signal(signal.SIGKILL)
    platform["kv_proc"].wait(30)
    assert ask(platform) == [want, want]

    for address in platform["workers"]:  # the survivor: no request left, every block free
        load = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address)).GetLoad(
            worker_pb2.LoadRequest(), timeout=10
        )
        assert (load.running, load.waiting, load.kv_blocks_free) == (0, 0, load.kv_blocks_total), address
