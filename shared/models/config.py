"""ModelConfig: one frozen description of a decoder model, normalised from a Hugging Face config.json.

Every family reads the same fields; family differences that are data (qkv bias, qk-norm, the MoE
routing rule, which layers are sparse) live here, and family differences that are structure (weight
names) live in the family file. `from_hf_config` is the only place that knows the many spellings
Hugging Face configs use for the same thing (`num_experts` / `num_local_experts` / `n_routed_experts`,
`rope_scaling` / `rope_parameters`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json that Tandem cannot run, with the field at fault in the message."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base, the rotated fraction of the head, and an optional scaling rule."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | yarn | llama3
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MoEConfig:
    """Sparse FFN: routed experts, the routing rule, and optional shared experts.

    scoring: "softmax" (Mixtral, Qwen-MoE) or "sigmoid" (DeepSeek-V3 / dots1, with a per-expert
    correction bias that only affects the choice of experts, never their weights).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
    # Which layers are sparse: layer i is MoE iff i >= first_dense_layers, i not in dense_layers,
    # and (i + 1) % sparse_step == 0.
    first_dense_layers: int = 0
    dense_layers: tuple[int, ...] = ()
    sparse_step: int = 1

    def is_sparse(self, layer: int) -> bool:
        return (
            layer >= self.first_dense_layers
            and layer not in self.dense_layers
            and (layer + 1) % self.sparse_step == 0
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias only)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, dots1)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # layers that use sliding_window
    moe: MoEConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def window_for(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding_layers else None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------


def _require(cfg: dict, key: str) -> Any:
    if cfg.get(key) is None:
        raise ConfigError(f"config.json: required field '{key}' is missing")
    return cfg[key]


def _first(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _rope_from_hf(cfg: dict) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(_first(params, "rope_theta", default=_first(cfg, "rope_theta", default=10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ConfigError(f"config.json: rope type '{rope_type}' is not supported")
    original = _first(params, "original_max_position_embeddings", default=None)
    if original is None and rope_type in ("yarn", "llama3", "dynamic"):
        original = _first(cfg, "original_max_position_embeddings", default=cfg.get("max_position_embeddings"))
    factor = params.get("factor")
    if factor is None and rope_type == "yarn" and original:
        factor = cfg["max_position_embeddings"] / original
    partial = _first(
        params, "partial_rotary_factor", default=_first(cfg, "partial_rotary_factor", default=1.0)
    )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(factor if factor is not None else 1.0),
        partial_rotary_factor=float(partial),
        original_max_position_embeddings=int(original) if original else None,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _moe_from_hf(cfg: dict, model_type: str) -> MoEConfig | None:
    num_experts = _first(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    if not num_experts:
        return None
    top_k = int(_require(cfg, "num_experts_per_tok"))
    if top_k > num_experts:
        raise ConfigError(f"config.json: num_experts_per_tok={top_k} exceeds the {num_experts} experts")
    if model_type == "mixtral":
        return MoEConfig(
            num_experts=num_experts, top_k=top_k, intermediate_size=int(cfg["intermediate_size"])
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        return MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            intermediate_size=int(_require(cfg, "moe_intermediate_size")),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            shared_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            dense_layers=tuple(cfg.get("mlp_only_layers") or ()),
            sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        )
    if model_type == "dots1":
        moe_inter = int(_require(cfg, "moe_intermediate_size"))
        n_group = int(cfg.get("n_group") or 1)
        if num_experts % n_group:
            raise ConfigError(
                f"config.json: n_routed_experts={num_experts} is not divisible by n_group={n_group}"
            )
        return MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            intermediate_size=moe_inter,
            scoring="sigmoid",
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
            n_group=n_group,
            topk_group=int(cfg.get("topk_group") or 1),
            shared_intermediate_size=moe_inter * int(cfg.get("n_shared_experts") or 0),
            first_dense_layers=int(cfg.get("first_k_dense_replace") or 0),
        )
    raise ConfigError(f"config.json: MoE fields for model_type '{model_type}' are not understood")


def _sliding_layers(cfg: dict, num_layers: int, model_type: str) -> tuple[int | None, tuple[int, ...]]:
    window = cfg.get("sliding_window")
    if not window:
        return None, ()
    layer_types = cfg.get("layer_types")
    if layer_types:
        layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    elif model_type in ("mistral", "mixtral"):
        layers = tuple(range(num_layers))
    elif cfg.get("use_sliding_window"):
        first_full = int(cfg.get("max_window_layers") or num_layers)
        layers = tuple(i for i in range(num_layers) if i >= first_full)
    else:
        layers = ()
    return (int(window) if layers else None), layers


def from_hf_config(cfg: dict) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict; ConfigError names what is wrong."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConfigError("config.json: 'architectures' is missing")
    model_type = _require(cfg, "model_type")
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    num_layers = int(_require(cfg, "num_hidden_layers"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(
            f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    window, sliding = _sliding_layers(cfg, num_layers, model_type)
    return ModelConfig(
        architecture=archs[0],
        model_type=model_type,
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        rope=_rope_from_hf(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(
            cfg.get("attention_bias") or cfg.get("qkv_bias") or model_type in ("qwen2", "qwen2_moe")
        ),
        o_bias=bool(cfg.get("attention_bias")) and model_type not in ("qwen2", "qwen2_moe"),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "dots1"),
        sliding_window=window,
        sliding_layers=sliding,
        moe=_moe_from_hf(cfg, model_type),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )
