"""Routing benchmark: a multi-tenant workload under `prefix_aware` vs `round_robin` routing.

    .venv/bin/python -m tests.bench.routing [--quick]

8 tenants, each with its own ~512-token system prompt, ask short questions (4 rounds; 2 with
--quick): every round sends one question per tenant in a shuffled order, at most 4 in flight. The
platform, as `tandem serve` processes: 2 prefill and 2 decode workers (128 MiB of KV cache each:
room for about 5 tenants' prefixes, so a worker that sees every tenant keeps evicting) and two
routers over the same workers, one per policy (disaggregation threshold 256 tokens, no KV store, so
what is measured is what each worker's own prefix cache gets from the routing). Each policy's run
uses its own cache salt, so it starts cold.

  hit_rate_*    prompt tokens served from a prefix cache / prompt tokens (from the usage)
  p90_ttft_*_s  90th percentile time to first token
  tok_s_*       output tokens / wall time of the run
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
import uuid

import grpc
import torch

from shared.engine import SamplingParams
from shared.rpc.convert import params_to_proto
from shared.tokenizer import Tokenizer
from tandem.v1 import common_pb2, router_pb2_grpc
from tests.bench.common import Processes, emit, environment, log, model_path, parser, quantiles

SUBJECTS = ["astronomy", "botany", "cooking", "databases", "economics", "farming", "geology", "history"]


def system_prompt(tok: Tokenizer, tenant: int, n_tokens: int) -> str:
    subject = SUBJECTS[tenant]
    text = f"You are the {subject} assistant of tenant {tenant}. "
    i = 0
    while len(tok.encode(text)) < n_tokens:
        text += f"Rule {i} of the {subject} desk: answer briefly and cite fact {tenant * 1000 + i}. "
        i += 1
    return text


async def run_policy(
    stub, prompts: dict[int, list[list[int]]], rounds: int, new_tokens: int, salt: str
) -> dict:
    gate = asyncio.Semaphore(4)
    ttft, cached, prompt_tokens, out_tokens = [], 0, 0, 0

    async def one(prompt: list[int]) -> None:
        nonlocal cached, prompt_tokens, out_tokens
        req = common_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt,
            params=params_to_proto(
                SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, cache_salt=salt)
            ),
        )
        async with gate:
            start = time.perf_counter()
            first = None
            async for chunk in stub.Generate(req):
                first = first or time.perf_counter() - start
                out_tokens += len(chunk.token_ids)
                if chunk.finish_reason:
                    cached += chunk.usage.cached_tokens
                    prompt_tokens += chunk.usage.prompt_tokens
            ttft.append(first)

    rng = random.Random(0)
    start = time.perf_counter()
    for r in range(rounds):
        order = list(prompts)
        rng.shuffle(order)
        await asyncio.gather(*(one(prompts[t][r]) for t in order))
    elapsed = time.perf_counter() - start
    return {"hit_rate": cached / prompt_tokens, "p90_ttft": quantiles(ttft)[1], "tok_s": out_tokens / elapsed}


async def measure(args, procs: Processes, path) -> dict:
    tenants, rounds = 8, (2 if args.quick else 4)
    new_tokens = 8 if args.quick else 16
    store = ["--store", str(path.parent), "--model", args.model, "--kv-cache-mb", "128"]
    prefill = [procs.start("worker", *store, "--role", "prefill") for _ in range(2)]
    decode = [procs.start("worker", *store, "--role", "decode") for _ in range(2)]
    workers = [a for w in (*prefill, *decode) for a in ("--worker", w)]
    routers = {
        policy: procs.start("router", *workers, "--policy", policy, "--health-interval", "0.5")
        for policy in ("round_robin", "prefix_aware")
    }
    await asyncio.sleep(1.5)
    tok = Tokenizer.from_dir(path)
    systems = [system_prompt(tok, t, 512) for t in range(tenants)]
    prompts = {
        t: [
            tok.encode_chat([{"role": "system", "content": systems[t]},
                             {"role": "user", "content": f"Question {r}: what is rule {3 * r + 1}?"}])
            for r in range(rounds)
        ]
        for t in range(tenants)
    }  # fmt: skip
    log(
        f"{tenants} tenants x {rounds} rounds, prompts of ~{len(prompts[0][0])} tokens, {new_tokens} new tokens"
    )
    results = {}
    for policy, address in routers.items():
        channel = grpc.aio.insecure_channel(address)
        stub = router_pb2_grpc.RouterStub(channel)
        await run_policy(stub, {0: [prompts[0][0][:40]]}, 1, 2, "warmup")
        got = await run_policy(stub, prompts, rounds, new_tokens, f"{policy}-{uuid.uuid4().hex}")
        await channel.close()
        log(f"  {policy}: {got}")
        results[f"hit_rate_{policy}"] = round(got["hit_rate"], 3)
        results[f"p90_ttft_{policy}_s"] = round(got["p90_ttft"], 3)
        results[f"tok_s_{policy}"] = round(got["tok_s"], 2)
    results["hit_rate_ratio"] = round(
        results["hit_rate_prefix_aware"] / max(results["hit_rate_round_robin"], 1e-9), 2
    )
    results["p90_ttft_ratio"] = round(
        results["p90_ttft_prefix_aware_s"] / results["p90_ttft_round_robin_s"], 3
    )
    return results


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    path = model_path(args)
    procs = Processes(args.threads)
    try:
        results = asyncio.run(measure(args, procs, path))
    finally:
        procs.down()
        shutil.rmtree(procs.dir, ignore_errors=True)
    results = {"model": args.model, **results, **environment(args)}
    emit(results)
    return results


if __name__ == "__main__":
    main()
