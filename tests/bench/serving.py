"""Serving benchmark: 32 concurrent streamed chat requests through the gateway vs the engine alone.

    .venv/bin/python -m tests.bench.serving [--quick]

The engine alone runs first, in this process, on the same chat-templated prompts (32 requests
added at once, stepped to completion). Then the platform starts as separate processes, as
`tandem serve` runs them (tokenizer, a monolithic worker with 2 torch threads, router, gateway), and
the official `openai` async client sends the same 32 requests as streamed chat completions. Greedy,
EOS ignored, 128 new tokens each (32 with --quick). Reported for both: output tok/s, time to first
token p50/p90 and inter-token latency p50/p90; ratio = gateway tok/s / engine tok/s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tests.bench.common import Processes, emit, environment, log, model_path, parser, quantiles

TOPICS = ["the sea", "a mountain", "a robot", "the moon", "a garden", "a city", "a river", "a cat"]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (#{i})."}]


def engine_alone(path: Path, n: int, new_tokens: int) -> dict:
    engine = LLMEngine.from_store(path, EngineConfig())
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [engine.tokenizer.encode_chat(messages(i)) for i in range(n)]
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm up
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    tokens = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            tokens += len(out.new_token_ids)
            if out.request_id not in first:
                first[out.request_id] = now - start
            else:
                gaps.append(now - last[out.request_id])
            last[out.request_id] = now
    elapsed = time.perf_counter() - start
    return {"tok_s": tokens / elapsed, "ttft": list(first.values()), "itl": gaps, "tokens": tokens}


async def through_gateway(url: str, model: str, n: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://{url}/v1", api_key="unused", max_retries=0, timeout=600)
    ttft: list[float] = []
    gaps: list[float] = []
    counts: list[int] = []

    async def one(i: int) -> None:
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model,
            messages=messages(i),
            temperature=0,
            max_tokens=new_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        prev = None
        async for chunk in stream:
            if chunk.usage is not None:
                counts.append(chunk.usage.completion_tokens)
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            now = time.perf_counter()
            if prev is None:
                ttft.append(now - start)
            else:
                gaps.append(now - prev)
            prev = now

    await one(0)  # warm up
    ttft.clear(), gaps.clear(), counts.clear()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    await client.close()
    return {"tok_s": sum(counts) / elapsed, "ttft": ttft, "itl": gaps, "tokens": sum(counts)}


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    n, new_tokens = 32, (32 if args.quick else 128)
    path = model_path(args)
    results = {"model": args.model, "requests": n, "new_tokens": new_tokens, **environment(args)}

    log(f"engine alone: {n} requests x {new_tokens} tokens")
    alone = engine_alone(path, n, new_tokens)
    services = Processes(args.threads)
    try:
        log("starting tokenizer, worker, router, gateway ...")
        store = ["--store", str(path.parent), "--model", args.model]
        tok = services.start("tokenizer", *store)
        router = services.start("router", "--worker", services.start("worker", *store))
        url = services.start(
            "gateway", "--tokenizer", tok, "--router", router, "--model", args.model, "--port", "0"
        )
        log(f"gateway: {n} streamed chat requests x {new_tokens} tokens")
        served = asyncio.run(through_gateway(url, args.model, n, new_tokens))
    finally:
        services.down()
    assert served["tokens"] == alone["tokens"] == n * new_tokens, (served["tokens"], alone["tokens"])
    results["engine_tok_s"] = round(alone["tok_s"], 1)
    results["gateway_tok_s"] = round(served["tok_s"], 1)
    results["ratio"] = round(served["tok_s"] / alone["tok_s"], 3)
    for prefix, data in (("", served), ("engine_", alone)):
        p50, p90 = quantiles(data["ttft"])
        results[f"{prefix}ttft_p50_s"], results[f"{prefix}ttft_p90_s"] = round(p50, 3), round(p90, 3)
        p50, p90 = quantiles(data["itl"])
        results[f"{prefix}itl_p50_s"], results[f"{prefix}itl_p90_s"] = round(p50, 4), round(p90, 4)
    emit(results)
    return results


if __name__ == "__main__":
    main()
