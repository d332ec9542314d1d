"""A bounded load test on real processes (tokenizer, worker, router, gateway, each `tandem serve`):
200 requests at 32 concurrency with the OpenAI SDK, mixed — streamed and not (in pairs with the same
seed), text completions, and streams the client drops after a few chunks. No request may fail, a
streamed answer must equal its non-streamed twin token for token (nothing lost or duplicated), and
afterwards the worker holds no request and every KV block is free."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import openai
import pytest

from shared.store import DEFAULT_MODEL as MODEL
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.bench.common import Processes

pytestmark = pytest.mark.slow
QUESTIONS = ["Name a colour.", "What is 2 + 3?", "Say hello in French.", "Name a planet.",
             "What is a cat?", "Give me a fruit.", "Count to five.", "Name an ocean."]  # fmt: skip
PAIRS, DROPPED, COMPLETIONS = 64, 36, 36  # 2 * 64 + 36 + 36 = 200 requests


@pytest.fixture(scope="module")
def served(store_root, default_model_dir):
    procs = Processes(threads=2)
    try:
        tokenizer = procs.start("tokenizer", "--store", str(store_root))
        worker = procs.start(
            "worker", "--store", str(store_root), "--kv-cache-mb", "256", "--max-num-seqs", "32"
        )
        router = procs.start("router", "--worker", worker)
        gateway = procs.start("gateway", "--tokenizer", tokenizer, "--router", router)
        yield {"url": f"http://{gateway}", "worker": worker}
    finally:
        procs.down()


def test_two_hundred_mixed_requests_at_32_concurrency(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="x", max_retries=0, timeout=300)

    def chat(i: int, stream: bool):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                  temperature=0.8, seed=i, max_tokens=10)  # fmt: skip
        if not stream:
            out = client.chat.completions.create(**kw)
            return out.choices[0].message.content, out.usage.completion_tokens
        chunks = list(
            client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    def dropped(i: int):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=200,
            temperature=0.8, seed=i, stream=True,
        )  # fmt: skip
        for n, _ in enumerate(stream):
            if n == 2:
                break
        stream.close()  # the client walks away: the platform must abort and free the request
        return "dropped"

    def completion(i: int):
        out = client.completions.create(model=MODEL, prompt=f"{i} + {i} =", max_tokens=6, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")
        return out.usage.completion_tokens

    jobs = [(chat, i, s) for i in range(PAIRS) for s in (False, True)]
    jobs += [(dropped, i) for i in range(DROPPED)] + [(completion, i) for i in range(COMPLETIONS)]
    jobs = [jobs[(k * 37) % len(jobs)] for k in range(len(jobs))]  # interleaved kinds (37 is coprime to 200)
    assert len(jobs) == 200 and len({id(j) for j in jobs}) == 200
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = {pool.submit(job[0], *job[1:]): job for job in jobs}
        results = {
            futures[f]: f.result() for f in concurrent.futures.as_completed(futures)
        }  # any error fails
    elapsed = time.perf_counter() - started

    for i in range(PAIRS):
        plain, streamed = results[(chat, i, False)], results[(chat, i, True)]
        assert streamed == plain, f"seed {i}: streamed {streamed!r} != non-streamed {plain!r}"
        assert 1 <= plain[1] <= 10
    assert all(results[(completion, i)] >= 1 for i in range(COMPLETIONS))

    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(served["worker"]))
    deadline = time.monotonic() + 30  # dropped streams' aborts land asynchronously
    while time.monotonic() < deadline:
        load = stub.GetLoad(worker_pb2.LoadRequest(), timeout=10)
        if (load.running, load.waiting, load.kv_blocks_free) == (0, 0, load.kv_blocks_total):
            break
        time.sleep(0.2)
    assert (load.running, load.waiting, load.kv_blocks_free) == (0, 0, load.kv_blocks_total)
    print(f"200 requests at 32 concurrency in {elapsed:.1f} s")
