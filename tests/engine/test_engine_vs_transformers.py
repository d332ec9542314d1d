"""The engine's greedy output is token-identical to transformers `generate` under any batching:
mixed prompt lengths, staggered arrivals, tiny prefill chunks, a tiny pool that forces preemption.
Also: prefix caching computes only the uncached suffix, abort frees every block, seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning",
    "Hi",
    "Emoji 🚀 and unicode café: the next word is",
]
MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(prompt_ids, hf_reference):
    model = hf_reference[0]
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = model.generate(
                torch.tensor([ids]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine.from_store(path, EngineConfig(**kw))


def _assert_pool_full(engine: LLMEngine):
    assert engine.pool.num_free == engine.pool.num_blocks
    assert not engine.requests and not engine.scheduler.has_unfinished()


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(long_prefill_chunk=5, max_num_batched_tokens=9),  # chunked prefill mixed with decodes
        dict(num_blocks=12, block_size=4),  # pool too small for all at once: preemption
        dict(max_num_seqs=2),  # requests queue and join as others finish
        dict(long_prefill_chunk=4, max_num_batched_tokens=4),  # steps where nothing samples
    ],
    ids=["default", "tiny-chunks", "preemption", "two-seqs", "chunk-only-steps"],
)
def test_greedy_identical_to_transformers(config, default_model_dir, prompt_ids, reference):
    engine = _engine(default_model_dir, **config)
    outs = engine.generate(prompt_ids, GREEDY)
    for out, want in zip(outs, reference, strict=True):
        assert out.output_token_ids == want
        assert out.finish_reason == "length"
    if "num_blocks" in config:
        assert engine.scheduler.num_preemptions > 0, "the tiny pool should have forced preemption"
    _assert_pool_full(engine)


def test_staggered_arrivals(default_model_dir, prompt_ids, reference):
    engine = _engine(default_model_dir, long_prefill_chunk=8)
    results, pending = {}, list(enumerate(prompt_ids))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # a new request every third step, joining a running batch
            i, ids = pending.pop(0)
            engine.add_request(f"r{i}", ids, GREEDY)
        for out in engine.step():
            if out.finished:
                results[int(out.request_id[1:])] = out.output_token_ids
        step += 1
    assert [results[i] for i in range(len(PROMPTS))] == reference
    _assert_pool_full(engine)


def test_prefix_cache_computes_only_the_suffix(default_model_dir, tok):
    system = "You are a meticulous assistant. " * 12
    first = tok.encode(system + "What is two plus two?")
    second = tok.encode(system + "Name a colour of the rainbow.")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    engine = _engine(default_model_dir, block_size=16)
    engine.generate([first], GREEDY)
    out = engine.generate([second], GREEDY)[0]
    assert out.num_cached_tokens == (shared // 16) * 16 > 0
    assert engine.pool.hits == shared // 16
    uncached = _engine(default_model_dir, enable_prefix_caching=False).generate([second], GREEDY)[0]
    assert uncached.num_cached_tokens == 0
    assert out.output_token_ids == uncached.output_token_ids
    # a different cache_salt (another tenant) shares nothing
    salted = SamplingParams(max_tokens=4, temperature=0.0, cache_salt="tenant-b")
    assert engine.generate([second], salted)[0].num_cached_tokens == 0
    _assert_pool_full(engine)


def test_abort_mid_generation_returns_every_block(default_model_dir, prompt_ids):
    engine = _engine(default_model_dir)
    for i, ids in enumerate(prompt_ids):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    engine.abort("r1")
    engine.abort("r3")
    assert engine.abort("r3") is False  # already gone
    for _ in range(3):
        engine.step()
    for rid in list(engine.requests):
        engine.abort(rid)
    _assert_pool_full(engine)


def test_seeded_sampling_is_reproducible_and_batch_invariant(default_model_dir, prompt_ids):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = _engine(default_model_dir).generate([prompt_ids[0]], params)[0].output_token_ids
    other = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batched = (
        _engine(default_model_dir)
        .generate([prompt_ids[2], prompt_ids[0], prompt_ids[1]], [other, params, other])[1]
        .output_token_ids
    )
    assert alone == batched
    different = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    assert _engine(default_model_dir).generate([prompt_ids[0]], different)[0].output_token_ids != alone


def test_logprobs_match_the_reference_distribution(default_model_dir, prompt_ids, hf_reference):
    engine = _engine(default_model_dir)
    out = engine.generate([prompt_ids[0]], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    lp = out.new_logprobs[0]
    with torch.no_grad():
        want = hf_reference[0](torch.tensor([prompt_ids[0]])).logits[0, -1].log_softmax(-1)
    assert lp.token_id == int(want.argmax())
    assert abs(lp.logprob - float(want.max())) < 1e-4
    assert [t for t, _ in lp.top] == want.topk(5).indices.tolist()


def test_stop_conditions(default_model_dir, prompt_ids, reference, tok):
    engine = _engine(default_model_dir)
    stop_at = reference[0][3]
    out = engine.generate(
        [prompt_ids[0]], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_at,))
    )[0]
    assert out.output_token_ids == reference[0][: reference[0].index(stop_at) + 1]
    assert out.finish_reason == "stop"
    chat = tok.encode_chat([{"role": "user", "content": "Say hi."}])
    out = engine.generate([chat], SamplingParams(max_tokens=200, temperature=0))[0]
    assert out.finish_reason == "stop" and out.output_token_ids[-1] == tok.eos_token_id
    out = engine.generate([chat], SamplingParams(max_tokens=40, temperature=0, min_tokens=40))[0]
    assert len(out.output_token_ids) == 40 and tok.eos_token_id not in out.output_token_ids


def test_bad_requests_are_rejected_without_leaking(default_model_dir):
    engine = _engine(default_model_dir)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("b", [10**6], SamplingParams())
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        engine.add_request("c", [1] * 100, SamplingParams(max_tokens=8192))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("d", [1, 2], SamplingParams(top_p=0))
    _assert_pool_full(engine)
