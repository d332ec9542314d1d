"""Multi-LoRA serving: requests for two adapters and for the base model share one batch of one engine
and each gets exactly what an engine with that adapter merged into its weights gives; prefix-cache
keys carry the adapter, so a prompt cached for the base is never reused for a fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.models.loader import load_model
from shared.models.lora import merge_adapter
from shared.train.config import LoraSpec
from shared.train.lora import adapter_state, apply_lora, save_adapter
from tests.tiny_models import make_tiny

CONFIG = EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=64, long_prefill_chunk=16)


def make_adapter(base: Path, out: Path, seed: int, targets: tuple[str, ...]) -> Path:
    """A random LoRA adapter in the PEFT format (peft leaves B at zero: randomise both)."""
    torch.manual_seed(seed)
    model = apply_lora(load_model(base), LoraSpec(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    out.mkdir()
    save_adapter(out, adapter_state(model), LoraSpec(r=4, alpha=8, target_modules=targets), "tiny")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-lora")
    make_tiny("llama", root / "tiny")
    a = make_adapter(root / "tiny", root / "a", 1, ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    b = make_adapter(root / "tiny", root / "b", 2, ("k_proj", "up_proj"))
    return root / "tiny", a, b


def greedy(engine: LLMEngine, jobs: list[tuple[list[int], str | None]], max_tokens: int = 12):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    for i, (prompt, lora) in enumerate(jobs):
        engine.add_request(str(i), prompt, params, lora=lora)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[str(i)] for i in range(len(jobs))]


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_adapters_and_base_in_one_batch_match_merged_models(tiny, cpu_kernels):
    base, a, b = tiny
    config = EngineConfig(**{**CONFIG.__dict__, "cpu_kernels": cpu_kernels})
    multi = LLMEngine(load_model(base), config)
    multi.add_lora("a", a)
    multi.add_lora("b", b)
    prompts = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 200, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    jobs = [(p, lora) for p in prompts for lora in (None, "a", "b")]
    got = greedy(multi, jobs)
    references = {
        None: LLMEngine(load_model(base), config),
        "a": LLMEngine(merge_adapter(load_model(base), a), config),
        "b": LLMEngine(merge_adapter(load_model(base), b), config),
    }
    for (prompt, lora), out in zip(jobs, got, strict=True):
        (want,) = greedy(references[lora], [(prompt, None)])
        assert out.output_token_ids == want.output_token_ids, (prompt, lora)
        for x, y in zip(out.new_logprobs or [], want.new_logprobs or [], strict=False):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    # the adapters really change the output (or the comparison above proves nothing)
    assert len({tuple(o.output_token_ids) for o in got[:3]}) == 3


def test_prefix_cache_never_mixes_adapters(tiny):
    base, a, _ = tiny
    engine = LLMEngine(load_model(base), CONFIG)
    engine.add_lora("a", a)
    prompt = list(range(10, 30))
    (first,) = greedy(engine, [(prompt, None)])
    (adapted,) = greedy(engine, [(prompt, "a")])
    (again,) = greedy(engine, [(prompt, "a")])
    assert (
        first.num_cached_tokens == 0 and adapted.num_cached_tokens == 0
    )  # the base's blocks are not the adapter's
    assert again.num_cached_tokens == 16 and again.output_token_ids == adapted.output_token_ids
    (want,) = greedy(LLMEngine(merge_adapter(load_model(base), a), CONFIG), [(prompt, None)])
    assert adapted.output_token_ids == want.output_token_ids


def test_adapter_slots_evict_the_least_recently_used_idle_one(tiny):
    base, a, b = tiny
    engine = LLMEngine(load_model(base), EngineConfig(**{**CONFIG.__dict__, "max_loras": 1}))
    engine.add_lora("a", a)
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=4), lora="a")
    with pytest.raises(ValueError, match="slots are in use"):
        engine.add_lora("b", b)
    engine.abort("busy")
    engine.add_lora("b", b)
    assert list(engine.loras) == ["b"]
    with pytest.raises(ValueError, match="not loaded"):
        engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=4), lora="a")
