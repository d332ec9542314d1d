"""Sampler on synthetic logits: each control shapes the distribution as specified."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from shared.core.sampling_params import SamplingParams
from shared.engine.request import Request
from shared.engine.sampler import Sampler

LOGITS = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))


def _draw(params: SamplingParams, n=2000, logits=LOGITS, output=()) -> Counter:
    sampler, counts = Sampler(), Counter()
    reqs = [Request(f"r{i}", [0], params, eos_token_ids=(4,)) for i in range(n)]
    for r in reqs:
        r.output_token_ids = list(output)
    for token, _ in sampler(logits.repeat(n, 1), reqs):
        counts[token] += 1
    return counts


def test_greedy_is_argmax():
    assert _draw(SamplingParams(temperature=0), n=10) == Counter({0: 10})


def test_temperature_one_follows_the_distribution():
    counts = _draw(SamplingParams(temperature=1.0, seed=None))
    for tok, p in enumerate([0.4, 0.3, 0.15, 0.1, 0.05]):
        assert abs(counts[tok] / 2000 - p) < 0.04


def test_top_k_top_p_min_p_restrict_support():
    assert set(_draw(SamplingParams(top_k=2))) == {0, 1}
    assert set(_draw(SamplingParams(top_p=0.6))) == {0, 1}  # 0.4 < 0.6, 0.4+0.3 crosses: keep 2
    assert set(_draw(SamplingParams(top_p=0.4))) == {0}
    assert set(_draw(SamplingParams(min_p=0.5))) == {0, 1}  # p >= 0.2 = 0.5 * 0.4


def test_penalties_and_bias():
    assert _draw(SamplingParams(temperature=0, logit_bias=((3, 10.0),)), n=5) == Counter({3: 5})
    # presence penalty of 2 on token 0 (seen in output) lowers it below token 1
    assert _draw(SamplingParams(temperature=0, presence_penalty=2.0), n=5, output=[0]) == Counter({1: 5})
    # repetition penalty on a negative logit multiplies it: token 0 (log .4) becomes far less likely
    assert _draw(SamplingParams(temperature=0, repetition_penalty=3.0), n=5, output=[0])[0] == 0


def test_min_tokens_masks_eos():
    eos_heavy = torch.log(torch.tensor([0.01, 0.01, 0.01, 0.01, 0.96]))
    counts = _draw(SamplingParams(temperature=1.0, min_tokens=3, max_tokens=5), n=200, logits=eos_heavy)
    assert counts[4] == 0


def test_seed_is_batch_invariant():
    sampler = Sampler()
    p = SamplingParams(temperature=1.0, seed=7)
    alone = sampler(LOGITS[None], [Request("a", [0], p)])[0][0]
    others = [Request(f"o{i}", [0], SamplingParams(temperature=1.0)) for i in range(5)]
    mixed = sampler(LOGITS.repeat(6, 1), [*others[:3], Request("a", [0], p), *others[3:]])[3][0]
    assert alone == mixed


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=2), "min_p"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(min_tokens=9, max_tokens=8), "min_tokens"),
    ],
)
def test_validation_names_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw).validate()
