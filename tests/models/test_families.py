"""Every supported family, proven on tiny random checkpoints that transformers itself creates
(config class + save_pretrained), imported through `tandem models import`, loaded from the store:
logits for a packed batch of sequences match transformers in fp32."""

from __future__ import annotations

import pytest
import torch

from shared.cli.main import main as tandem_main
from shared.models.attention import VarlenAttention
from shared.models.loader import load_model

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CASES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True)),
    "llama-rope-linear": (
        "LlamaConfig",
        dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    ),
    "llama-rope-dynamic": (
        "LlamaConfig",
        dict(
            max_position_embeddings=16,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),
    "llama-rope-yarn": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 500000.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "deepseek-moe-dots1": (
        "Dots1Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
    ),
}
SEQ_LENS = [23, 5, 40]  # 40 > the dynamic-rope case's trained length of 16 and the sliding window of 8


def _randomize(model: torch.nn.Module) -> None:
    # Random init leaves norms at 1 and biases at 0; perturb everything so no path is trivially exact.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_family_logits_match_transformers(case, tmp_path, store_root, report):
    config_cls, extra = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**{**BASE, **extra})
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _randomize(ref)
    src = tmp_path / case
    ref.save_pretrained(src)

    name = f"tiny-{case}"
    assert tandem_main(["models", "--store", str(store_root), "import", str(src), "--name", name]) == 0
    ours = load_model(store_root / name)

    seqs = [torch.randint(0, BASE["vocab_size"], (n,)) for n in SEQ_LENS]
    # Dynamic NTK scales by the longest sequence in a forward (as transformers does for a padded
    # batch), so that case is compared one sequence per forward; the others as one packed batch.
    batches = [[s] for s in seqs] if "dynamic" in case else [seqs]
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            lens = [len(s) for s in batch]
            positions = torch.cat([torch.arange(n) for n in lens])
            got = ours.compute_logits(ours(torch.cat(batch), positions, VarlenAttention(lens)))
            start = 0
            for s in batch:
                want = ref(s[None]).logits[0]
                worst = max(worst, (got[start : start + len(s)] - want).abs().max().item())
                start += len(s)
    report(f"tiny {case}: max|Δlogit| vs transformers = {worst:.2e}")
    assert worst < 1e-4, f"{case}: logits differ by {worst}"
