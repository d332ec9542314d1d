"""Tiny random checkpoints of every supported family, made by transformers itself (config class +
random init + save_pretrained), for tests that compare against transformers."""

from __future__ import annotations

from pathlib import Path

import torch

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


def randomize(model: torch.nn.Module) -> None:
    # Random init leaves norms at 1 and biases at 0; perturb everything so no path is trivially exact.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)


def make_tiny(case: str, out_dir: Path, seed: int = 0):
    """Save the tiny `case` checkpoint into out_dir; returns the transformers model (eval, fp32)."""
    import transformers

    config_cls, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**BASE, **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model)
    model.save_pretrained(out_dir)
    return model
