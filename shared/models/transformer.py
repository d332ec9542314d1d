"""The decoder stack every family builds on: embeddings, N pre-norm decoder layers, final norm, LM head.

A family subclasses `CausalLM`, names the Hugging Face architectures it serves and, where its
checkpoint names differ from the Llama layout, rewrites them in `checkpoint_name`. Whether a layer's
FFN is dense or sparse is data (ModelConfig.moe), not a subclass.

forward(input_ids [T], positions [T], attn) -> hidden [T, D]; compute_logits(hidden) -> [T, V].
A flat token batch plus an attention backend covers every caller: the engine's mixed prefill/decode
steps over a paged cache, full-sequence scoring, and training on packed sequences.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from shared.models.attention import AttentionBackend
from shared.models.config import ModelConfig
from shared.models.layers import Attention, GatedMLP, RMSNorm
from shared.models.linear import Linear
from shared.models.moe import SparseMoE
from shared.models.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe is not None and cfg.moe.is_sparse(layer):
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    #: Hugging Face `architectures` values this class serves.
    architectures: tuple[str, ...] = ()
    #: (pattern, replacement) rewrites from checkpoint names to this module's names, applied in order.
    renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg)
        self.model = DecoderBody(cfg, self.rotary)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(
            self.lm_head, nn.Linear
        ):  # (a quantized head is its own)
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, D]
        for layer in self.model.layers:
            x = layer(x, positions, attn)
        return self.model.norm(x)

    def fuse_for_inference(self) -> CausalLM:
        """Merge projections that read the same input (q/k/v, gate/up) into one matmul each.
        For serving only: the fused model's parameter names no longer match checkpoints."""
        for module in self.modules():
            if isinstance(module, (Attention, GatedMLP)):
                module.fuse()
        return self

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden, contiguous=False)  # [T, V], possibly a transposed view

    def moe_layers(self) -> list[tuple[int, SparseMoE]]:
        return [
            (i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoE)
        ]

    @classmethod
    def checkpoint_name(cls, name: str) -> str:
        for pattern, repl in cls.renames:
            name = re.sub(pattern, repl, name)
        return name
