"""Prefill-only -> KV handoff (through its wire form) -> decode-from-imported-KV continues exactly as a
monolithic run; stop strings and streamed text through the engine; the asyncio engine's streams,
aborts and errors. Every test ends with every KV block back in its pool."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from shared.engine import AsyncLLMEngine, EngineConfig, KVHandoff, LLMEngine, SamplingParams
from shared.engine.kv_transfer import from_wire, to_wire

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Write two sentences about the sea."}]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return LLMEngine.from_store(default_model_dir, EngineConfig())


@pytest.fixture(scope="module")
def decode_engine(default_model_dir):
    # a second engine, as a decode worker would be: its own cache, nothing of the prompt in it
    return LLMEngine.from_store(default_model_dir, EngineConfig(enable_prefix_caching=False))


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.tokenizer.encode_chat(CHAT)


def run(engine: LLMEngine, request_id, prompt, params, **kw):
    engine.add_request(request_id, prompt, params, **kw)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def pools_full(*engines):
    return all(e.pool.num_free == e.pool.num_blocks and not e.requests for e in engines)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=30, temperature=0.0),
        SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=1234, frequency_penalty=0.5),
        SamplingParams(max_tokens=30, temperature=0.0, stop=("sea",), logprobs=2),
    ],
    ids=["greedy", "seeded-sampling", "stop-string"],
)
def test_prefill_export_import_decode_equals_monolithic(engine, decode_engine, prompt, params):
    mono = engine.generate([prompt], params)[0]
    prefill = run(engine, "p", prompt, params, prefill_only=True)
    last = prefill[-1]
    assert last.finished and last.finish_reason == "handoff" and last.kv_handoff is not None
    handoff = last.kv_handoff
    assert handoff.num_tokens == len(prompt) and handoff.payload.shape[0] == -(-len(prompt) // 16)
    assert len(handoff.block_keys) == len(prompt) // 16
    # through the wire form: dtype name, shape, raw bytes
    dtype, shape, data = to_wire(handoff.payload)
    assert len(data) == handoff.payload.numel() * 4
    wired = dataclasses.replace(handoff, payload=from_wire(dtype, shape, data))
    decode = run(decode_engine, "d", prompt, params, kv_handoff=wired)
    final = decode[-1]
    assert final.output_token_ids == mono.output_token_ids
    assert final.finish_reason == mono.finish_reason and final.stop_reason == mono.stop_reason
    assert final.text == mono.text
    assert last.new_text + "".join(o.new_text for o in decode) == mono.text
    if params.logprobs:
        lps = [lp for o in prefill + decode for lp in o.new_logprobs]
        want = [lp for o in [mono] for lp in o.new_logprobs]  # generate keeps only the last output
        assert lps[-1].token_id == want[-1].token_id
    # the decode engine computed only the tokens after the prompt
    assert decode_engine.pool.hits == 0
    assert pools_full(engine, decode_engine)


def test_float16_kv_handoff_equals_monolithic_and_needs_a_float16_cache(
    default_model_dir, decode_engine, prompt
):
    """kv_cache_dtype=float16 on both sides: the handoff carries float16 blocks (2 bytes an element
    on the wire) and the decode engine continues as a float16 monolithic engine would; a float32
    cache refuses them by layout."""
    config = EngineConfig(kv_cache_dtype="float16", kv_cache_bytes=64 * 2**20)
    prefill_engine = LLMEngine.from_store(default_model_dir, config)
    decode16 = LLMEngine.from_store(
        default_model_dir, dataclasses.replace(config, enable_prefix_caching=False)
    )
    params = SamplingParams(max_tokens=20, temperature=0.0)
    mono = prefill_engine.generate([prompt], params)[0]
    handoff = run(prefill_engine, "p16", prompt, params, prefill_only=True)[-1].kv_handoff
    assert handoff.payload.dtype == torch.float16 and handoff.layout.startswith("torch.float16/")
    dtype, shape, data = to_wire(handoff.payload)
    assert dtype == "float16" and len(data) == handoff.payload.numel() * 2
    wired = dataclasses.replace(handoff, payload=from_wire(dtype, shape, data))
    with pytest.raises(ValueError, match="layout"):
        decode_engine.add_request("d32", prompt, params, kv_handoff=wired)
    assert (
        run(decode16, "d16", prompt, params, kv_handoff=wired)[-1].output_token_ids == mono.output_token_ids
    )
    assert pools_full(prefill_engine, decode16, decode_engine)


def test_prefill_only_that_finishes_on_its_first_token_has_no_handoff(engine, prompt):
    out = run(engine, "p1", prompt, SamplingParams(max_tokens=1, temperature=0), prefill_only=True)[-1]
    assert out.finish_reason == "length" and out.kv_handoff is None
    assert pools_full(engine)


def test_bad_handoffs_are_rejected_without_leaking(engine, decode_engine, prompt):
    params = SamplingParams(max_tokens=8, temperature=0)
    handoff: KVHandoff = run(engine, "p2", prompt, params, prefill_only=True)[-1].kv_handoff
    bad = [
        (dataclasses.replace(handoff, layout="bfloat16/30L/3x64/B16"), "layout"),
        (dataclasses.replace(handoff, payload=handoff.payload[:-1]), "shape"),
        (dataclasses.replace(handoff, first_token=10**7), "vocabulary"),
    ]
    for h, message in bad:
        with pytest.raises(ValueError, match=message):
            decode_engine.add_request("bad", prompt, params, kv_handoff=h)
    with pytest.raises(ValueError, match="covers"):
        decode_engine.add_request("bad", prompt + [42], params, kv_handoff=handoff)
    with pytest.raises(ValueError, match="dtype"):
        from_wire("int3", (1,), b"\0")
    with pytest.raises(ValueError, match="bytes"):
        from_wire("float32", (2, 2), b"\0" * 15)
    assert pools_full(engine, decode_engine)


def test_stop_string_through_the_engine(engine, prompt):
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    words = full.text.split()
    stop = words[3]  # a word in the middle of the reply
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    assert len(out.output_token_ids) < len(full.output_token_ids)
    assert pools_full(engine)


# -- the asyncio engine -------------------------------------------------------------------------


def test_async_streams_match_sync_and_abort_frees_blocks(default_model_dir, engine, prompt):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = engine.generate([prompt, prompt[:-3]], params)

    async def main():
        aeng = AsyncLLMEngine(LLMEngine.from_store(default_model_dir, EngineConfig()))

        async def collect(rid, ids):
            outs = [o async for o in await aeng.add_request(rid, ids, params)]
            return outs

        a, b = await asyncio.gather(collect("a", prompt), collect("b", prompt[:-3]))
        for outs, w in zip((a, b), want, strict=True):
            assert [t for o in outs for t in o.new_token_ids] == w.output_token_ids
            assert "".join(o.new_text for o in outs) == w.text and outs[-1].finish_reason == "length"

        # abort mid-stream: the stream ends with "abort", the blocks come back
        stream = await aeng.add_request("c", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
        seen = []
        async for out in stream:
            seen.append(out)
            if len(seen) == 3:
                assert await aeng.abort("c")
        assert seen[-1].finish_reason == "abort" and len(seen) < 50

        # a consumer that walks away (break + close) aborts its request
        stream = await aeng.add_request("d", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        # and so does a cancelled consumer
        stream = await aeng.add_request("e", prompt, SamplingParams(max_tokens=500, ignore_eos=True))

        async def consume():
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not aeng.engine.has_unfinished():
                break
            await asyncio.sleep(0.05)

        # a caller cancelled while the engine thread is adding its request leaves no orphan behind
        add = aeng.engine.add_request

        def slow_add(*args, **kwargs):
            time.sleep(0.3)
            return add(*args, **kwargs)

        aeng.engine.add_request = slow_add
        task = asyncio.create_task(
            aeng.add_request("g", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
        )
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        aeng.engine.add_request = add
        await aeng.call(lambda: None)  # every queued command has run
        assert "g" not in aeng.streams and not aeng.engine.has_unfinished()

        # errors reach the caller; the id stays usable after a rejected request
        with pytest.raises(ValueError, match="top_p"):
            await aeng.add_request("f", prompt, SamplingParams(top_p=2))
        with pytest.raises(ValueError, match="at least one token"):
            await aeng.add_request("f", [], SamplingParams())
        outs = [o async for o in aeng.generate("f", prompt, SamplingParams(max_tokens=2, temperature=0))]
        assert outs[-1].finished and not await aeng.abort("f")
        load = aeng.load()
        await aeng.shutdown()
        return aeng, load

    aeng, load = asyncio.run(main())
    assert load["running"] == 0 and load["waiting"] == 0
    assert pools_full(aeng.engine)


def test_async_engine_failure_fails_streams_and_refuses_work(default_model_dir, prompt):
    async def main():
        aeng = AsyncLLMEngine(LLMEngine.from_store(default_model_dir, EngineConfig()))
        stream = await aeng.add_request("a", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
        await stream.__anext__()

        def broken(*_):
            raise RuntimeError("simulated device failure")

        aeng.engine.runner.execute = broken
        with pytest.raises(RuntimeError, match="simulated device failure"):
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="no longer accepts"):
            await aeng.add_request("b", prompt, SamplingParams())

    asyncio.run(main())


def test_kv_payload_is_the_cache_content(engine, prompt):
    """The payload's block i, layer l, K holds exactly what the model computes for those positions."""
    handoff = run(engine, "p3", prompt, SamplingParams(max_tokens=4, temperature=0), prefill_only=True)[-1]
    payload = handoff.kv_handoff.payload  # [blocks, L, 2, K, B, D]
    blocks, layers, two, heads, bs, dim = payload.shape
    k0 = payload[:, 0, 0].permute(0, 2, 1, 3).reshape(blocks * bs, heads, dim)[: len(prompt)]
    # recompute layer 0's keys directly: norm -> k projection -> rotary
    model = engine.model
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor(prompt))
        attn = model.model.layers[0].self_attn
        h = model.model.layers[0].input_layernorm(x)
        _, k, _ = attn.qkv_proj(h).split((attn.num_heads * dim, heads * dim, heads * dim), dim=-1)
        k = k.reshape(len(prompt), heads, dim)
        _, k = attn.rotary[0](torch.arange(len(prompt)), k.new_zeros(len(prompt), 1, dim), k)
    assert torch.allclose(k0, k, atol=1e-4)
    assert pools_full(engine)


def test_prefix_kv_from_another_engine_computes_only_the_suffix(engine, decode_engine, prompt):
    """A worker that fetched a prefix's blocks (here: read from another engine's cache) computes only
    the rest, and the output is the monolithic one."""
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = run(engine, "pk-ref", prompt, params)[-1]
    keys = engine.prompt_keys(prompt)
    usable = (len(prompt) - 1) // 16
    assert engine.cached_prefix_len(keys) == len(keys)  # the finished request left them behind
    prefix = engine.read_cached(keys[:usable])
    assert prefix.shape == (usable, *engine.runner.block_shape)
    before = decode_engine.prompt_tokens_computed
    got = run(decode_engine, "pk", prompt, params, prefix_kv=prefix)[-1]
    assert got.output_token_ids == want.output_token_ids and got.text == want.text
    assert got.num_cached_tokens == usable * 16
    assert decode_engine.prompt_tokens_computed - before == len(prompt) - usable * 16
    whole = engine.read_cached(keys + keys)  # more blocks than the prompt has: rejected, nothing leaks
    with pytest.raises(ValueError, match="at least its last token"):
        decode_engine.add_request("pk-bad", prompt[: whole.shape[0] * 16], params, prefix_kv=whole)
    with pytest.raises(ValueError, match="block shape"):
        decode_engine.add_request("pk-bad", prompt, params, prefix_kv=prefix[:, :2])
    assert pools_full(engine, decode_engine)
