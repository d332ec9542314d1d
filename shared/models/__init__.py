"""Model families: one file per family over shared layers; `model_class` picks the family by the
Hugging Face architecture name a config.json declares."""

from __future__ import annotations

from shared.models.config import ConfigError, ModelConfig, from_hf_config
from shared.models.deepseek_moe import DeepseekMoeForCausalLM
from shared.models.llama import LlamaForCausalLM
from shared.models.mixtral import MixtralForCausalLM
from shared.models.qwen2 import Qwen2ForCausalLM
from shared.models.qwen_moe import QwenMoeForCausalLM
from shared.models.transformer import CausalLM

FAMILIES: tuple[type[CausalLM], ...] = (
    LlamaForCausalLM,
    Qwen2ForCausalLM,
    MixtralForCausalLM,
    QwenMoeForCausalLM,
    DeepseekMoeForCausalLM,
)
ARCHITECTURES: dict[str, type[CausalLM]] = {a: cls for cls in FAMILIES for a in cls.architectures}

# Architectures we know of but cannot run yet, with the reason users see.
UNSUPPORTED_REASONS = {
    "DeepseekV2ForCausalLM": "it uses Multi-head Latent Attention (MLA), which Tandem does not implement yet",
    "DeepseekV3ForCausalLM": "it uses Multi-head Latent Attention (MLA), which Tandem does not implement yet",
}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    cls = ARCHITECTURES.get(cfg.architecture)
    if cls is None:
        reason = UNSUPPORTED_REASONS.get(cfg.architecture, "it is not a supported architecture")
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"cannot run '{cfg.architecture}': {reason} (supported: {supported})")
    return cls


__all__ = ["ARCHITECTURES", "CausalLM", "ConfigError", "ModelConfig", "from_hf_config", "model_class"]
