"""SmolLM2-135M-Instruct from the store matches transformers (loaded from the same GGUF) in fp32:
next-token logits for varied prompts, and identical greedy continuations."""

from __future__ import annotations

import time

import pytest
import torch

from shared.models.attention import VarlenAttention
from shared.models.loader import load_model
from shared.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Emoji and unicode: 🚀🔥 café naïve 日本語のテキスト — «quotes»",
    "   Whitespace\t\truns\n\n\nand numbers 3.14159 and 2024-11-22",
]
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three primary colours."},
]
LOGIT_ATOL = 2e-4  # fp32, same weights: differences are summation order only


@pytest.fixture(scope="module")
def ours(default_model_dir):
    t0 = time.perf_counter()
    model = load_model(default_model_dir, device="cpu", dtype=torch.float32)
    print(f"\nload_model(smollm2-135m-instruct) took {time.perf_counter() - t0:.2f}s")
    return model, Tokenizer.from_dir(default_model_dir)


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), VarlenAttention([len(ids)]))
    return model.compute_logits(hidden[-1:])[0]


def _all_prompts(tok) -> list[list[int]]:
    return [tok.encode(p) for p in PROMPTS] + [tok.encode_chat(CHAT)]


def test_load_is_fast(default_model_dir, report):
    t0 = time.perf_counter()
    load_model(default_model_dir)
    elapsed = time.perf_counter() - t0
    report(f"smollm2-135m-instruct: load_model from the store took {elapsed:.2f}s")
    assert elapsed < 10, f"loading the default model took {elapsed:.1f}s"


@torch.no_grad()
def test_next_token_logits_match_transformers(ours, hf_reference, report):
    model, tok = ours
    hf_model, _ = hf_reference
    worst = 0.0
    for ids in _all_prompts(tok):
        got = _last_logits(model, ids)
        want = hf_model(torch.tensor([ids])).logits[0, -1]
        diff = (got - want).abs().max().item()
        worst = max(worst, diff)
        report(
            f"smollm2-135m-instruct: {len(ids):3d}-token prompt, next-token max|Δlogit| vs transformers = {diff:.2e}"
        )
        assert diff < LOGIT_ATOL, f"logits differ by {diff} for prompt ids {ids[:8]}..."
        assert got.argmax() == want.argmax()
    report(f"smollm2-135m-instruct: worst max|Δlogit| over {len(PROMPTS) + 1} prompts = {worst:.2e}")


@torch.no_grad()
def test_full_sequence_logits_match_for_a_packed_batch(ours, hf_reference, report):
    """Every position of every prompt, with all prompts packed into one flat batch."""
    model, tok = ours
    hf_model, _ = hf_reference
    prompts = _all_prompts(tok)
    flat = torch.tensor([t for ids in prompts for t in ids])
    positions = torch.cat([torch.arange(len(ids)) for ids in prompts])
    logits = model.compute_logits(model(flat, positions, VarlenAttention([len(p) for p in prompts])))
    start = 0
    for ids in prompts:
        want = hf_model(torch.tensor([ids])).logits[0]
        diff = (logits[start : start + len(ids)] - want).abs().max().item()
        assert diff < LOGIT_ATOL, diff
        start += len(ids)
    report(f"smollm2-135m-instruct: all positions of {len(prompts)} packed prompts within {LOGIT_ATOL:.0e}")


@torch.no_grad()
def test_greedy_32_tokens_identical(ours, hf_reference):
    model, tok = ours
    hf_model, _ = hf_reference
    for ids in [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[2]), tok.encode_chat(CHAT)]:
        want = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
        seq = list(ids)
        for _ in range(32):
            seq.append(int(_last_logits(model, seq).argmax()))
        got = seq[len(ids) :]
        print(f"\ngreedy: {tok.decode(got)!r}")
        assert got == want
