"""Qwen2 / Qwen2.5 (bias on the q/k/v projections) and dense Qwen3 (per-head qk RMSNorm, no bias).

Both differences are ModelConfig data (qkv_bias, qk_norm) read from config.json; the checkpoint
layout is the Llama one.
"""

from shared.models.transformer import CausalLM


class Qwen2ForCausalLM(CausalLM):
    architectures = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
