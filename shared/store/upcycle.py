"""Sparse upcycling: a dense checkpoint becomes a mixture-of-experts one whose every expert starts as a
copy of the dense FFN (Komatsuzaki et al., "Sparse Upcycling", 2022).

    upcycle(src_dir, dst_dir, experts=8, top_k=2, shared_experts=0, noise=0.0)

Without shared experts the result is a Mixtral checkpoint; with S shared experts, a Qwen2-MoE one
whose shared expert is S copies of the FFN side by side. With noise 0 the MoE model computes exactly
the dense model's function:
  - the router weights are zero, so every expert gets the same probability; the top-k weights are
    renormalised to sum to 1, and a sum of identical experts weighted to 1 is the FFN itself;
  - with shared experts, the routed experts' down projections are halved (routed part: FFN / 2), and
    the shared expert — S copies side by side, its down projection divided by S, so it computes the
    FFN — sits behind a zero gate, sigmoid(0) = 1/2 (shared part: FFN / 2): together the FFN.
With noise σ > 0 the router weights are drawn from N(0, σ²) and each expert's weights get relative
Gaussian noise of σ, so experts differ and routing matters (what training then specialises).
Supported sources: dense Llama / Mistral layouts (gate/up/down SwiGLU MLP, no attention bias).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.models.loader import checkpoint_files

DENSE = ("llama", "mistral")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


class UpcycleError(ValueError):
    pass


def upcycle(
    src: Path,
    dst: Path,
    experts: int,
    top_k: int,
    shared_experts: int = 0,
    noise: float = 0.0,
    seed: int = 0,
) -> dict:
    """Write the upcycled checkpoint into `dst` (an empty directory); returns its config."""
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") not in DENSE:
        raise UpcycleError(
            f"can upcycle dense {'/'.join(DENSE)} models, not model_type '{cfg.get('model_type')}'"
        )
    if experts < 2:
        raise UpcycleError(f"--experts must be at least 2, got {experts}")
    if not 1 <= top_k <= experts:
        raise UpcycleError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    if shared_experts < 0 or noise < 0:
        raise UpcycleError("--shared-experts and --noise must not be negative")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(checkpoint_files(src).values())):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    tie = cfg.get("tie_word_embeddings", False)
    if tie and "lm_head.weight" not in tensors:  # write the head out: the MoE config does not tie
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    out: dict[str, torch.Tensor] = {}
    hidden = cfg["hidden_size"]
    for key, t in tensors.items():
        if ".mlp." not in key:
            out[key] = t.contiguous()
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp."
        gate, up, down = (tensors[p + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
        router = (
            torch.randn(experts, hidden, generator=gen) * noise if noise else torch.zeros(experts, hidden)
        )
        routed_scale = 0.5 if shared_experts else 1.0
        for e in range(experts):
            g, u, d = (_jitter(w, noise, gen) for w in (gate, up, down))
            if shared_experts:
                q = f"model.layers.{layer}.mlp.experts.{e}."
                out[q + "gate_proj.weight"], out[q + "up_proj.weight"] = g, u
                out[q + "down_proj.weight"] = d * routed_scale
            else:
                q = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
                out[q + "w1.weight"], out[q + "w3.weight"], out[q + "w2.weight"] = g, u, d
        if shared_experts:
            out[p + "gate.weight"] = router.to(gate.dtype)
            out.update(_shared(p, gate, up, down, shared_experts))
            for name in ("q", "k", "v"):  # Qwen2 attention has biases: zero ones change nothing
                rows = tensors[f"model.layers.{layer}.self_attn.{name}_proj.weight"].shape[0]
                out[f"model.layers.{layer}.self_attn.{name}_proj.bias"] = torch.zeros(rows, dtype=gate.dtype)
        else:
            out[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = router.to(gate.dtype)
    new_cfg = _moe_config(cfg, experts, top_k, shared_experts)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(new_cfg, indent=2))
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return new_cfg


def _jitter(w: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    if not noise:
        return w.clone()
    return w * (1 + noise * torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.dtype))


def _shared(prefix: str, gate, up, down, copies: int) -> dict[str, torch.Tensor]:
    """S copies of the FFN as one shared expert of S·I that computes the FFN (gate/up stacked, down
    side by side and divided by S), behind a zero gate."""
    q = prefix + "shared_expert."
    return {
        q + "gate_proj.weight": torch.cat([gate] * copies, dim=0).contiguous(),
        q + "up_proj.weight": torch.cat([up] * copies, dim=0).contiguous(),
        q + "down_proj.weight": (torch.cat([down] * copies, dim=1) / copies).contiguous(),
        prefix + "shared_expert_gate.weight": torch.zeros(1, gate.shape[1], dtype=gate.dtype),
    }


def _moe_config(cfg: dict, experts: int, top_k: int, shared: int) -> dict:
    keep = {
        k: cfg[k]
        for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
            "bos_token_id", "eos_token_id", "hidden_act", "head_dim", "initializer_range",
        )
        if k in cfg
    }  # fmt: skip
    keep["tie_word_embeddings"] = False
    keep["torch_dtype"] = cfg.get("torch_dtype", "float32")
    if not shared:
        return {
            **keep,
            "model_type": "mixtral",
            "architectures": ["MixtralForCausalLM"],
            "intermediate_size": cfg["intermediate_size"],
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
            "router_jitter_noise": 0.0,
            "sliding_window": cfg.get("sliding_window"),
            "output_router_logits": False,
        }
    return {
        **keep,
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "intermediate_size": cfg["intermediate_size"] * shared,
        "moe_intermediate_size": cfg["intermediate_size"],
        "shared_expert_intermediate_size": cfg["intermediate_size"] * shared,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "output_router_logits": False,
    }
