"""Speculative decoding (shared/engine/speculative.py).

Greedy outputs are identical to decoding without speculation — for prompt lookup and for a draft model
that disagrees often, with chunked prefill, a pool small enough to preempt, penalties, stop tokens and
logprobs — and nothing leaks: every block is free afterwards and the draft's shadows are gone. Blocks
cached while speculating hold the right KV (a later request that hits them continues as a cold one
would). The rejection rule keeps the target distribution: for a point-mass proposal (prompt lookup, a
greedy draft) and for a sampled draft distribution q, the emitted tokens' frequencies match p.
"""

from __future__ import annotations

import pytest
import torch

from shared.core.sampling_params import SamplingParams
from shared.engine import EngineConfig, LLMEngine
from shared.engine.request import Request
from shared.engine.sampler import Sampler
from shared.engine.speculative import SpecConfig, Speculator, ngram_lookup
from shared.models.loader import load_model
from shared.store import DEFAULT_MODEL
from tests.tiny_models import make_tiny

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "target"
    make_tiny("llama", path, seed=0)
    return path


def tiny_engine(path, draft_noise: float | None = None, **config) -> LLMEngine:
    """The tiny model; with draft_noise, a draft that is the same model with noise added (it agrees
    with the target often, not always)."""
    draft = None
    if draft_noise is not None:
        draft = load_model(path)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * draft_noise * p.abs().mean())
    config = {"block_size": 4, "num_blocks": 256, "cpu_kernels": True, **config}
    return LLMEngine(load_model(path), EngineConfig(**config), "tiny", eos_token_ids=(), draft=draft)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for n in (5, 17, 33, 9):
        ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        out.append(ids + ids[: n // 2] + ids)  # repeats, so prompt lookup finds n-grams
    return out


def assert_clean(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    assert engine.pool.num_free == engine.pool.num_blocks
    if engine.speculator.draft is not None:
        draft = engine.speculator.draft
        assert not draft.shadows and draft.kv.pool.num_free == draft.kv.pool.num_blocks


CONFIGS = {
    "default": {},
    "tiny-chunks": {"long_prefill_chunk": 6, "max_num_batched_tokens": 9},  # drafts trimmed to fit
    "preemption": {"num_blocks": 40},
}


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_greedy_is_identical_to_no_speculation(tiny_dir, method, config):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.output_token_ids for o in tiny_engine(tiny_dir, **config).generate(prompts(), params)]
    engine = tiny_engine(
        tiny_dir, draft_noise=0.5 if method == "draft" else None, speculative=method, **config
    )
    got = engine.generate(prompts(), params)
    assert [o.output_token_ids for o in got] == want
    stats = engine.speculator.stats[method]
    assert stats.accepted_tokens > 0, stats
    if method == "draft":
        assert stats.accepted_tokens < stats.draft_tokens, "the noisy draft should be rejected sometimes"
    if config is CONFIGS["preemption"]:
        assert engine.scheduler.num_preemptions > 0
    assert_clean(engine)


def test_penalties_stop_tokens_and_logprobs_follow_the_accepted_tokens(tiny_dir):
    base = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, repetition_penalty=1.1,
                          frequency_penalty=0.1, logprobs=2)  # fmt: skip
    ref = tiny_engine(tiny_dir)
    want = ref.generate(prompts(), base)
    stop = want[1].output_token_ids[20]  # a token the second request makes mid-way
    params = [base] * 4
    params[1] = SamplingParams(**{**base.__dict__, "stop_token_ids": (stop,), "min_tokens": 3})
    want = ref.generate(prompts(), params)
    for method, noise in (("ngram", None), ("draft", 0.3)):
        engine = tiny_engine(tiny_dir, draft_noise=noise)
        got = engine.generate(
            prompts(), [SamplingParams(**{**p.__dict__, "speculative": method}) for p in params]
        )
        for g, w in zip(got, want, strict=True):
            assert g.output_token_ids == w.output_token_ids
            assert g.finish_reason == w.finish_reason and g.stop_reason == w.stop_reason
        stats = engine.speculator.stats[method]
        assert 0 < stats.accepted_tokens < stats.draft_tokens, (method, stats)
        assert_clean(engine)
    engine = tiny_engine(tiny_dir, speculative="ngram")
    for rid, p in (("a", base), ("b", base)):
        engine.add_request(rid, prompts()[2], p)
    streamed = {"a": [], "b": []}
    while engine.has_unfinished():
        for out in engine.step():
            assert len(out.new_logprobs) == len(out.new_token_ids)
            streamed[out.request_id] += out.new_logprobs
    want_lps = ref.generate([prompts()[2]], base)[0]
    for lps in streamed.values():
        assert [lp.token_id for lp in lps] == want_lps.output_token_ids
    assert max(len(o) for o in [streamed["a"]]) == 48


def test_blocks_cached_while_speculating_hold_the_right_kv(tiny_dir):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = tiny_engine(tiny_dir, draft_noise=0.5, speculative="draft")
    prompt = prompts()[1]
    first = engine.generate([prompt], params)[0]
    follow = prompt + first.output_token_ids[:33]
    again = engine.generate([follow], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                     speculative="off"))[0]  # fmt: skip
    assert again.num_cached_tokens >= len(prompt) + 28  # blocks written by verified steps were hit
    cold = tiny_engine(tiny_dir, enable_prefix_caching=False)
    assert again.output_token_ids == cold.generate([follow], SamplingParams(max_tokens=20, temperature=0,
                                                                             ignore_eos=True))[0].output_token_ids  # fmt: skip


def test_bad_choices_are_refused(tiny_dir):
    engine = tiny_engine(tiny_dir)
    with pytest.raises(ValueError, match="speculative 'draft' needs a draft model"):
        engine.add_request("x", [1, 2, 3], SamplingParams(speculative="draft"))
    with pytest.raises(ValueError, match="speculative must be one of off, ngram, draft"):
        engine.add_request("y", [1, 2, 3], SamplingParams(speculative="fast"))
    with pytest.raises(ValueError, match=r"speculative_tokens must be in \[1, 16\]"):
        engine.add_request("z", [1, 2, 3], SamplingParams(speculative_tokens=0))
    with pytest.raises(ValueError, match="'draft' needs a draft model"):
        tiny_engine(tiny_dir, speculative="draft")
    assert_clean(engine)


def test_ngram_lookup_takes_the_latest_longest_match():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3, 4, 2) == [7, 5, 1]
    assert ngram_lookup([4, 2, 3, 8, 1, 2, 3], 2, 3, 2) == [8, 1]
    assert ngram_lookup([1, 2, 3, 4], 3, 3, 2) == []
    assert ngram_lookup([5, 6, 5], 3, 4, 1) == [6, 5]


# -- the rejection rule keeps the target distribution --------------------------------------------------

V = 6
TRIALS = 12000


def _setup(k: int):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(k + 1, V, generator=gen) * 1.5
    q = torch.softmax(torch.randn(k, V, generator=gen) * 1.5, -1)
    spec = Speculator(SpecConfig(method="ngram"), Sampler())
    return logits, q, spec


def _tally(sampled_q: bool):
    logits, q, spec = _setup(2)
    draws = torch.Generator().manual_seed(5)
    first = torch.zeros(V)
    second = torch.zeros(V)
    for trial in range(TRIALS):
        request = Request(f"r{trial}", [1, 2, 3], SamplingParams(temperature=1.0, seed=trial))
        if sampled_q:
            request.spec_token_ids = [int(torch.multinomial(q[i], 1, generator=draws)) for i in range(2)]
            request.spec_probs = q
        else:
            request.spec_token_ids = [1, 4]  # a point-mass proposal (prompt lookup, a greedy draft)
        out = spec.verify(request, logits)
        first[out[0][0]] += 1
        if len(out) > 1:
            assert out[0][0] == request.spec_token_ids[0]
            second[out[1][0]] += 1
    p = torch.softmax(logits, -1)
    return first / first.sum(), second / second.sum(), p, spec.stats["ngram"]


@pytest.mark.parametrize("sampled_q", [False, True], ids=["point-mass", "sampled-draft"])
def test_rejection_rule_emits_the_target_distribution(sampled_q):
    first, second, p, stats = _tally(sampled_q)
    # total variation of TRIALS draws over 6 outcomes: ~0.01 by chance
    assert (first - p[0]).abs().sum() / 2 < 0.03, (first, p[0])
    assert (second - p[1]).abs().sum() / 2 < 0.04, (second, p[1])
    assert 0 < stats.accepted_tokens < stats.draft_tokens


def test_a_worker_configured_with_a_draft_model_keeps_greedy_text(store_root, default_model_dir):
    """The deploy path: the worker's Config names the draft by its store name; the real model drafting
    for itself (its own copy) accepts everything and changes nothing."""
    from services.worker.main import Config

    cfg = Config(store=str(store_root), speculative="draft", draft_model=DEFAULT_MODEL,
                 kv_cache_mb=64).engine_config()  # fmt: skip
    assert (cfg.speculative, cfg.draft_model) == ("draft", str(default_model_dir))
    engine = LLMEngine.from_store(default_model_dir, cfg)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List three colors."}])
    params = SamplingParams(max_tokens=24, temperature=0)
    got = engine.generate([prompt], params)[0]
    want = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, speculative="off"))[0]
    assert got.output_token_ids == want.output_token_ids
    stats = engine.speculator.stats["draft"]
    assert stats.draft_tokens > 0 and stats.accepted_tokens == stats.draft_tokens
    assert_clean(engine)


PASSAGE = (
    "The lighthouse on the northern cape was built in 1871 from granite quarried on the island. Its lamp "
    "burned whale oil until 1902, then paraffin, and since 1958 it has been electric. The keeper's house "
    "beside it is now a museum of shipwrecks, with the bell of the steamer Orkney, which sank in the storm "
    "of 1893, hanging in its hall. Visitors climb 142 steps to the gallery, from which on a clear day the "
    "mainland can be seen thirty miles to the south."
)


def test_one_request_verified_in_the_one_team_decode_step_matches_plain_decoding(default_model_dir):
    """SmolLM2 with up to 3 drafts: the last token and its drafts are 2-4 decode rows of one sequence,
    which the CPU kernels run on one thread team (decode_step.h). Each row attends to the rows before it,
    so their K/V must be in the cache before any row attends (a row on the other thread once read a slot
    still holding a rejected draft's K/V): the same tokens and log-probabilities as plain decoding."""
    engine = LLMEngine.from_store(default_model_dir, EngineConfig(num_speculative_tokens=3))
    prompt = engine.tokenizer.encode_chat(
        [{"role": "user", "content": f"Summarize this text, quoting its key sentences:\n\n{PASSAGE}"}]
    )

    def decode(method: str) -> list[tuple[int, float]]:
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, speculative=method, logprobs=0)
        engine.add_request(method, prompt, params)
        got: list[tuple[int, float]] = []
        while engine.has_unfinished():
            for out in engine.step():
                got += [(lp.token_id, lp.logprob) for lp in out.new_logprobs]
        return got

    plain, spec = decode("off"), decode("ngram")
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert max(abs(a - b) for (_, a), (_, b) in zip(spec, plain, strict=True)) < 1e-4
    stats = engine.speculator.stats["ngram"]
    assert 0 < stats.accepted_tokens < stats.draft_tokens, stats  # verify steps, some drafts rejected
    assert_clean(engine)
