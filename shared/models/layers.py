"""Layers every family shares: RMSNorm, the SwiGLU MLP, GQA self-attention.

Module and parameter names follow the Hugging Face Llama layout (q_proj, k_proj, ..., gate_proj,
up_proj, down_proj), so most checkpoints load by name; family files map the rest. Inputs are flat
token batches [T, ...] (see attention.py for the shape legend); nothing here knows about a KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.attention import AttentionBackend
from shared.models.config import ModelConfig
from shared.models.linear import Linear
from shared.models.quant import QuantLinear
from shared.models.quant import fuse as fuse_quantized
from shared.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, then scale in the input dtype.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def _fused_linear(parts: list[nn.Linear]) -> Linear:
    """One Linear whose output is the given layers' outputs side by side (inference only)."""
    if isinstance(parts[0], QuantLinear):
        return fuse_quantized(parts)
    first = parts[0]
    fused = Linear(
        first.in_features,
        sum(p.out_features for p in parts),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.gate_up_proj: Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """For serving: gate and up in one matmul. Replaces gate_proj/up_proj (training keeps them,
        since checkpoints and LoRA adapters name them)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = _fused_linear([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x, contiguous=False).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """GQA self-attention: projections, optional per-head qk RMSNorm, RoPE, then the backend."""

    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.window_for(layer)
        self.scale = self.head_dim**-0.5
        self.rotary = [rotary]  # shared, not a submodule: keeps the state dict free of rope buffers
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj: Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """For serving: q, k and v in one matmul. Replaces q_proj/k_proj/v_proj (training keeps them,
        since checkpoints and LoRA adapters name them)."""
        if self.qkv_proj is None:
            self.qkv_proj = _fused_linear([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        t, h, kv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None and self.q_norm is None:
            # q and k sit side by side in the fused output: rotate them as one [T, H + K, D] tensor
            qkv = self.qkv_proj(x)
            qk = self.rotary[0].rotate(positions, qkv[:, : (h + kv) * d].view(t, h + kv, d))
            q, k = qk[:, :h], qk[:, h:]
            o = attn.forward(self.layer, q, k, qkv[:, (h + kv) * d :].view(t, kv, d), self.scale, self.window)
            return self.o_proj(o.reshape(t, h * d))
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split((h * d, kv * d, kv * d), dim=-1)
            q, k, v = q.view(t, h, d), k.view(t, kv, d), v.view(t, kv, d)
        else:
            q = self.q_proj(x).view(t, h, d)  # [T, H, D]
            k = self.k_proj(x).view(t, kv, d)  # [T, K, D]
            v = self.v_proj(x).view(t, kv, d)  # [T, K, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary[0](positions, q, k)
        o = attn.forward(self.layer, q, k, v, self.scale, self.window)  # [T, H, D]
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))
