"""CUDA paths: the same model code and engine on a GPU agree with the CPU. Skipped without CUDA
(CI has none); run on a GPU machine with `python -m pytest tests/gpu`."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.models.attention import VarlenAttention
from shared.models.loader import load_model
from tests.tiny_models import make_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llama", "qwen2-moe"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return path, make_tiny(request.param, path)


def test_forward_on_cuda_matches_transformers_on_cpu(checkpoint):
    path, ref = checkpoint
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = load_model(path, device="cuda", dtype=torch.float32)
    lens = [17, 5, 30]
    seqs = [torch.randint(0, 256, (n,)) for n in lens]
    with torch.no_grad():
        positions = torch.cat([torch.arange(n) for n in lens]).cuda()
        got = ours.compute_logits(ours(torch.cat(seqs).cuda(), positions, VarlenAttention(lens))).cpu()
        start = 0
        for s in seqs:
            want = ref(s[None]).logits[0]
            assert (got[start : start + len(s)] - want).abs().max().item() < 1e-4
            start += len(s)


@pytest.mark.parametrize("kw", [dict(), dict(num_blocks=10, block_size=4, long_prefill_chunk=6)])
def test_engine_on_cuda_matches_cpu(checkpoint, kw):
    path, _ = checkpoint
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (9, 3, 14)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    cpu = LLMEngine.from_store(path, EngineConfig(**kw)).generate(prompts, params)
    gpu_engine = LLMEngine.from_store(path, EngineConfig(device="cuda", **kw))
    gpu = gpu_engine.generate(prompts, params)
    assert [o.output_token_ids for o in gpu] == [o.output_token_ids for o in cpu]
    assert gpu_engine.pool.num_free == gpu_engine.pool.num_blocks
    seeded = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert (
        gpu_engine.generate(prompts[:1], seeded)[0].output_token_ids
        == LLMEngine.from_store(path, EngineConfig(device="cuda", **kw))
        .generate(prompts[:1], seeded)[0]
        .output_token_ids
    )


def test_engine_runs_in_bfloat16_on_cuda(checkpoint):
    path, _ = checkpoint
    engine = LLMEngine.from_store(path, EngineConfig(device="cuda", dtype="bfloat16"))
    out = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 6


def test_kv_handoff_from_cpu_prefill_to_cuda_decode(checkpoint):
    """The KV payload is device-neutral: a CPU prefill hands over to a CUDA decode."""
    path, _ = checkpoint
    prompt = torch.randint(0, 256, (21,)).tolist()
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    mono = LLMEngine.from_store(path, EngineConfig()).generate([prompt], params)[0]
    prefill = LLMEngine.from_store(path, EngineConfig())
    prefill.add_request("p", prompt, params, prefill_only=True)
    outs = []
    while prefill.has_unfinished():
        outs += prefill.step()
    decode = LLMEngine.from_store(path, EngineConfig(device="cuda"))
    decode.add_request("d", prompt, params, kv_handoff=outs[-1].kv_handoff)
    while decode.has_unfinished():
        final = decode.step()[-1]
    assert final.output_token_ids == mono.output_token_ids
    assert decode.pool.num_free == decode.pool.num_blocks
