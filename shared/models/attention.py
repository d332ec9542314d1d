"""Attention backends: the seam between model code and how K/V are stored.

Model code computes q, k, v for a flat batch of tokens and hands them to a backend object passed in
with the forward call; the backend decides where K/V live (nowhere, a paged cache, a remote store)
and which keys each query may see. The model file never knows.

Shapes (legend used across shared/models):
  T  tokens in the flat batch (all sequences concatenated)
  H  query heads, K  key/value heads (GQA: H % K == 0), D  head dim

`VarlenAttention` is the cache-free backend: causal attention within each sequence of a packed batch,
never across sequences. It serves the correctness tests, full-sequence scoring and training (packed
documents are separate sequences, so a document never attends across a boundary).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, K, D]
        v: torch.Tensor,  # [T, K, D]
        scale: float,
        window: int | None,
    ) -> torch.Tensor:  # [T, H, D]
        ...


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True = may attend. Queries are the last q_len of kv_len keys."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def sdpa(
    q: torch.Tensor,  # [B, H, Q, D]
    k: torch.Tensor,  # [B, K, S, D]
    v: torch.Tensor,  # [B, K, S, D]
    scale: float,
    mask: torch.Tensor | None,  # [Q, S] bool or None for plain causal with Q == S
) -> torch.Tensor:  # [B, H, Q, D]
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class VarlenAttention:
    """Causal self-attention over sequences packed back to back, with no KV cache.

    seq_lens: the length of each sequence in the flat batch, in order. Equal lengths run as one
    batched call; otherwise each sequence runs alone (still one kernel per sequence, no padding).
    """

    def __init__(self, seq_lens: list[int]):
        self.seq_lens = list(seq_lens)

    def forward(self, layer, q, k, v, scale, window):
        lens = self.seq_lens
        if len(set(lens)) == 1:
            b, n = len(lens), lens[0]
            out = self._attend(
                q.view(b, n, *q.shape[1:]),
                k.view(b, n, *k.shape[1:]),
                v.view(b, n, *v.shape[1:]),
                scale,
                window,
            )
            return out.reshape(q.shape)
        outs, start = [], 0
        for n in lens:
            sl = slice(start, start + n)
            outs.append(self._attend(q[None, sl], k[None, sl], v[None, sl], scale, window)[0])
            start += n
        return torch.cat(outs, dim=0)

    @staticmethod
    def _attend(q, k, v, scale, window):  # [B, N, H, D] -> [B, N, H, D]
        n = q.shape[1]
        mask = causal_mask(n, n, window, q.device) if window is not None and window < n else None
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, mask)
        return out.transpose(1, 2)
