"""Disaggregation benchmark: TTFT of a long prompt, monolithic vs disaggregated, with the KV transfer
separated, and the KV store's put/get throughput per tier.

    .venv/bin/python -m tests.bench.disagg [--quick]

Processes, as `tandem serve` runs them: a KV store (memory tier), a second KV store on a Redis
(memory budget 0, so every byte goes to and comes from Redis), a monolithic worker, a prefill and a
decode worker on the first store, and a router that sends every prompt to the prefill worker
(disaggregation threshold 0). Each prompt carries a fresh cache salt, so nothing is cached.

  ttft_monolithic_s   first token of a 1,024-token prompt (512 with --quick) on the monolithic worker
                      — this is also prefill_compute_s, the compute the handoff rides on
  ttft_disagg_s       the same through the router: prefill, publish the blocks, first token
  kv_transfer_s       publish (prefill worker: put + lease) + import (decode worker: get + assemble),
                      from the workers' own timers; transfer_fraction = kv_transfer_s / prefill_compute_s
  store_*_mb_s        KVStoreClient put/get of the same blocks against the memory-tier store
  redis_*_mb_s        the same against the Redis-tier store
Best of --repeats (default 3; 2 with --quick) for each.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import grpc
import torch

from shared.engine import SamplingParams
from shared.engine.kv_transfer import to_wire
from shared.kvstore.client import KVStoreClient
from shared.rpc.convert import params_to_proto
from shared.tokenizer import Tokenizer
from tandem.v1 import common_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.bench.common import Processes, emit, environment, log, model_path, parser
from tests.redis_server import start_redis


def long_prompt(tok: Tokenizer, n: int) -> list[int]:
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(n))
    return tok.encode(text)[:n]


async def first_chunk_time(stub, prompt: list[int], max_tokens: int) -> tuple[float, list]:
    req = common_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=prompt,
        params=params_to_proto(
            SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, cache_salt=uuid.uuid4().hex
            )
        ),
    )
    start = time.perf_counter()
    first, chunks = None, []
    async for chunk in stub.Generate(req):
        first = first or time.perf_counter() - start
        chunks.append(chunk)
    return first, chunks


async def load(stub) -> worker_pb2.LoadReport:
    return await stub.GetLoad(worker_pb2.LoadRequest())


async def throughput(address: str, payload: torch.Tensor, layout: str, repeats: int) -> tuple[float, float]:
    client = KVStoreClient(address, timeout=120)
    mb = payload.numel() * payload.element_size() / 1e6
    best_put = best_get = float("inf")
    for _ in range(repeats):
        keys = [uuid.uuid4().bytes for _ in range(payload.shape[0])]
        t0 = time.perf_counter()
        await client.put_blocks(keys, payload, layout)
        best_put = min(best_put, time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = await client.get_blocks(keys, layout)
        best_get = min(best_get, time.perf_counter() - t0)
        assert torch.equal(got, payload)
    await client.close()
    return mb / best_put, mb / best_get


async def measure(args, procs: Processes, path, redis_url: str) -> dict:
    store = ["--store", str(path.parent), "--model", args.model]
    n_tokens = 512 if args.quick else 1024
    repeats = args.repeats or (2 if args.quick else 3)
    kv = procs.start("kvstore", "--memory-mb", "2048")
    kv_redis = procs.start("kvstore", "--memory-mb", "0", "--redis", redis_url)
    mono = procs.start("worker", *store)
    prefill = procs.start("worker", *store, "--role", "prefill", "--kvstore", kv)
    decode = procs.start("worker", *store, "--role", "decode", "--kvstore", kv)
    router = procs.start("router", "--worker", prefill, "--worker", decode, "--kvstore", kv,
                         "--disagg-threshold", "0", "--health-interval", "0.5")  # fmt: skip
    channels = [grpc.aio.insecure_channel(a) for a in (mono, prefill, decode, router)]
    mono_s, prefill_s, decode_s = (worker_pb2_grpc.WorkerStub(c) for c in channels[:3])
    router_s = router_pb2_grpc.RouterStub(channels[3])
    await asyncio.sleep(1.5)  # the router's first health round sees both roles

    prompt = long_prompt(Tokenizer.from_dir(path), n_tokens)
    log(f"prompt: {len(prompt)} tokens, {repeats} repeats")
    await first_chunk_time(mono_s, prompt[:64], 1)  # warm up every process
    await first_chunk_time(router_s, prompt[:64], 2)
    ttft_mono = ttft_disagg = transfer = publish_best = import_best = float("inf")
    for _ in range(repeats):
        t, _ = await first_chunk_time(mono_s, prompt, 1)
        ttft_mono = min(ttft_mono, t)
        p0, d0 = await load(prefill_s), await load(decode_s)
        t, chunks = await first_chunk_time(router_s, prompt, 4)
        assert chunks[0].worker == prefill and chunks[-1].worker == decode, "not disaggregated"
        p1, d1 = await load(prefill_s), await load(decode_s)
        pub = p1.kv_publish_seconds - p0.kv_publish_seconds
        imp = d1.kv_import_seconds - d0.kv_import_seconds
        ttft_disagg = min(ttft_disagg, t)
        if pub + imp < transfer:
            transfer, publish_best, import_best = pub + imp, pub, imp
        log(f"  ttft monolithic {ttft_mono:.3f}s  disagg {t:.3f}s  publish {pub:.3f}s  import {imp:.3f}s")

    # store throughput with blocks of the real layout: the prompt's KV from the prefill
    load_report = await load(prefill_s)
    layout = load_report.kv_layout
    layers, kv_heads, head_dim = _layout_dims(layout)
    payload = torch.randn(n_tokens // 16, layers, 2, kv_heads, 16, head_dim)
    block_mb = to_wire(payload[:1])[2].__len__() / 1e6
    store_put, store_get = await throughput(kv, payload, layout, repeats)
    redis_put, redis_get = await throughput(kv_redis, payload, layout, repeats)
    for c in channels:
        await c.close()
    return {
        "prompt_tokens": len(prompt),
        "ttft_monolithic_s": round(ttft_mono, 3),
        "ttft_disagg_s": round(ttft_disagg, 3),
        "prefill_compute_s": round(ttft_mono, 3),
        "kv_publish_s": round(publish_best, 4),
        "kv_import_s": round(import_best, 4),
        "kv_transfer_s": round(transfer, 4),
        "transfer_fraction": round(transfer / ttft_mono, 3),
        "kv_block_mb": round(block_mb, 3),
        "kv_payload_mb": round(payload.numel() * 4 / 1e6, 1),
        "store_put_mb_s": round(store_put, 1),
        "store_get_mb_s": round(store_get, 1),
        "redis_put_mb_s": round(redis_put, 1),
        "redis_get_mb_s": round(redis_get, 1),
    }


def _layout_dims(layout: str) -> tuple[int, int, int]:
    """'float32/30L/3x64/B16' -> (30, 3, 64)."""
    _, layers, heads, _ = layout.split("/")
    k, d = heads.split("x")
    return int(layers.rstrip("L")), int(k), int(d)


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    path = model_path(args)
    procs = Processes(args.threads)
    redis_proc, redis_url = start_redis(procs.dir)
    try:
        results = asyncio.run(measure(args, procs, path, redis_url))
    finally:
        procs.down()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(procs.dir, ignore_errors=True)
    results = {"model": args.model, **results, **environment(args)}
    emit(results)
    return results


if __name__ == "__main__":
    main()
