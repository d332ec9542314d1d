"""PagedAttention: the attention backend over the engine's paged KV cache (PyTorch, any device).

Cache layout per layer: k_cache, v_cache [num_blocks * B, K, D] — a flat array of slots, where slot
s = block_id * B + offset holds one token's K (or V). A sequence's keys are the slots its block table
names, in order:

    block table [7, 2, 9], B = 4      positions 0..3 -> slots 28..31, 4..7 -> 8..11, 8..9 -> 36..37

Each step the runner writes the new tokens' K/V at `slot_mapping`, then attends. Two kinds of
sequence in one step:
  * decodes (one query token): gathered together into one padded [N, S_max] batch, one SDPA call;
  * prefill chunks (several query tokens, possibly after a cached prefix): one SDPA each, with a
    causal mask offset by the number of tokens already in the cache.
A fused paged-attention kernel (e.g. FlashAttention / FlashInfer on CUDA) replaces `forward` behind
the same metadata; this implementation is the portable reference and is what runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.models.attention import causal_mask, sdpa


@dataclass
class PagedMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V go
    # decodes: rows of the flat batch, their key slots padded to S_max, and which slots are real
    decode_rows: torch.Tensor  # [N]
    decode_slots: torch.Tensor  # [N, S_max]
    decode_valid: torch.Tensor  # [N, S_max] bool
    decode_positions: torch.Tensor  # [N] position of each decode query (for sliding windows)
    # prefill chunks: (first row in the flat batch, query length, key slots [S])
    prefills: list[tuple[int, int, torch.Tensor]]


class PagedAttention:
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], meta: PagedMetadata):
        self.k_caches, self.v_caches, self.meta = k_caches, v_caches, meta

    def forward(self, layer, q, k, v, scale, window):
        meta = self.meta
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        k_cache[meta.slot_mapping] = k.to(k_cache.dtype)
        v_cache[meta.slot_mapping] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        if meta.decode_rows.numel():
            out[meta.decode_rows] = self._decode(q[meta.decode_rows], k_cache, v_cache, scale, window)
        for start, q_len, slots in meta.prefills:
            qs = q[start : start + q_len].transpose(0, 1)[None]  # [1, H, Q, D]
            ks = k_cache[slots].transpose(0, 1)[None]  # [1, K, S, D]
            vs = v_cache[slots].transpose(0, 1)[None]
            s = slots.shape[0]
            mask = None if (q_len == s and window is None) else causal_mask(q_len, s, window, q.device)
            out[start : start + q_len] = sdpa(qs, ks, vs, scale, mask)[0].transpose(0, 1)
        return out

    def _decode(self, q, k_cache, v_cache, scale, window):
        meta = self.meta
        ks = k_cache[meta.decode_slots].transpose(1, 2)  # [N, K, S_max, D]
        vs = v_cache[meta.decode_slots].transpose(1, 2)
        valid = meta.decode_valid
        if window is not None:
            key_pos = torch.arange(valid.shape[1], device=valid.device)[None, :]
            valid = valid & (key_pos > meta.decode_positions[:, None] - window)
        out = sdpa(q[:, :, None, :], ks, vs, scale, valid[:, None, None, :])  # [N, H, 1, D]
        return out[:, :, 0, :]
