"""Rotary position embedding (RoPE) with the scaling rules Hugging Face configs declare.

Layout is the Hugging Face "rotate half" one: a head vector [x1 | x2] of the rotated width R rotates
pairs (x1[i], x2[i]) by angle pos * inv_freq[i]. GGUF files store q/k weights permuted for llama.cpp's
interleaved layout; the GGUF importer undoes that, so the model only ever sees this layout.

With partial rotary (partial_rotary_factor < 1) only the first R = head_dim * factor dims rotate.

Scaling rules (inv_freq is [R/2]; attention_factor multiplies cos and sin):
  default  inv_freq = theta^(-2i/R)
  linear   inv_freq / factor                      (position interpolation)
  dynamic  theta grows with the sequence once it passes the trained length (NTK-aware); the length
           is the largest position in the forward call, as in transformers' batched forward
  yarn     per-frequency blend of interpolated and extrapolated inv_freq, plus attention_factor
  llama3   low frequencies divided by factor, high kept, a smooth ramp between
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.models.config import ModelConfig, RopeConfig


def rotary_dim(cfg: ModelConfig) -> int:
    return int(cfg.head_dim * cfg.rope.partial_rotary_factor)


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # [R/2]: 1 keeps the original frequency
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _dynamic_inv_freq(rope: RopeConfig, dim: int, seq_len: int, max_pos: int) -> torch.Tensor:
    original = rope.original_max_position_embeddings or max_pos
    if seq_len <= original:
        return _base_inv_freq(rope.theta, dim)
    base = rope.theta * ((rope.factor * seq_len / original) - (rope.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q [T, H, D] and k [T, KV, D] at absolute positions [T]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rope = cfg.rope
        self.dim = rotary_dim(cfg)
        self.max_pos = cfg.max_position_embeddings
        inv_freq, self.attention_factor = self._compute()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Every layer of one forward rotates at the same positions: compute cos/sin once per tensor.
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _compute(self) -> tuple[torch.Tensor, float]:
        if self.rope.rope_type == "yarn":
            return _yarn(self.rope, self.dim)
        if self.rope.rope_type == "llama3":
            return _llama3(self.rope, self.dim), 1.0
        inv_freq = _base_inv_freq(self.rope.theta, self.dim)
        if self.rope.rope_type == "linear":
            inv_freq = inv_freq / self.rope.factor
        return inv_freq, 1.0

    def materialize(self, device: torch.device | str) -> None:
        """Recompute the (non-persistent) frequencies on a real device after a meta-device build."""
        self.inv_freq = self._compute()[0].to(device)
        self._memo = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, R/2] (float32) for the given positions."""
        inv_freq = self.inv_freq
        if self.rope.rope_type == "dynamic" and positions.numel():
            seq_len = int(positions.max()) + 1
            inv_freq = _dynamic_inv_freq(self.rope, self.dim, seq_len, self.max_pos).to(inv_freq.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, R/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def _cached_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memo = self._memo
        if memo is not None and memo[0] is positions:
            return memo[1], memo[2]
        cos, sin = self.cos_sin(positions)
        self._memo = (positions, cos, sin)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cached_cos_sin(positions)
        return apply_rotary(q, cos, sin, self.dim), apply_rotary(k, cos, sin, self.dim)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RoPE on one [T, heads, D] tensor (e.g. q and k heads side by side)."""
        return apply_rotary(x, *self._cached_cos_sin(positions), self.dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, R/2]; rotates the first R = dim channels of each head."""
    half = dim // 2
    cos = cos[:, None, :].to(x.dtype)  # [T, 1, R/2]
    sin = sin[:, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:dim], x[..., dim:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
