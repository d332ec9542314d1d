"""PagedAttention: the attention backend over the engine's paged KV cache (PyTorch, any device).

Cache layout per layer: k_cache, v_cache [num_blocks, K, B, D] (head-major inside a block). Token
position p of a sequence lives in block block_table[p // B] at offset p % B:

    block table [7, 2, 9], B = 4      positions 0..3 -> block 7, 4..7 -> block 2, 8..9 -> block 9

Viewed as rows of [num_blocks * K, B, D], one (block, head) row holds B consecutive keys of one head,
so gathering a sequence's rows in (head, block) order yields its keys as a contiguous [K, S, D]
tensor, SDPA's layout, with one `index_select` of B*D-value rows (copying per token is several
times slower on CPU).

Each step the runner writes the new tokens' K/V at their (block, offset), then attends. Two kinds of
sequence in one step:
  * decodes (one query token): gathered into a padded [N, K, S_max, D] batch, one SDPA call;
  * prefill chunks (several query tokens): one SDPA each. A chunk that starts at position 0 attends
    to its own k/v directly; a later chunk, or one after a cached prefix, gathers its blocks and
    uses a causal mask offset by the tokens already in the cache.
A fused paged-attention kernel (FlashAttention / FlashInfer on CUDA) replaces `forward` behind the
same metadata; this implementation is the portable reference and is what runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.models.attention import causal_mask, sdpa


@dataclass
class PrefillChunk:
    start: int  # first row in the flat batch
    num_queries: int
    num_keys: int  # tokens of the sequence up to the chunk's end (context + chunk)
    gather: torch.Tensor | None  # [K * blocks] rows to gather when the chunk has context, else None


@dataclass
class PagedMetadata:
    write_rows: torch.Tensor  # [T * K] row of [num_blocks * K * B, D] for each new token's head
    # decodes: their rows in the flat batch, (block, head) rows to gather, which keys are real
    decode_rows: torch.Tensor  # [N]
    decode_gather: torch.Tensor  # [N * K * max_blocks] rows of [num_blocks * K, B, D]
    decode_valid: torch.Tensor  # [N, max_blocks * B] bool
    decode_positions: torch.Tensor  # [N] position of each decode query (for sliding windows)
    prefills: list[PrefillChunk]
    all_decode: bool = False  # every row is a decode (the common steady state)
    _bias: torch.Tensor | None = None

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """decode_valid as an additive mask [N, 1, 1, S] (0 or -inf), made once per step."""
        if self._bias is None or self._bias.dtype != dtype:
            bias = torch.zeros(self.decode_valid.shape, dtype=dtype, device=self.decode_valid.device)
            self._bias = bias.masked_fill_(~self.decode_valid, float("-inf"))[:, None, None, :]
        return self._bias


class PagedAttention:
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], meta: PagedMetadata):
        self.k_caches, self.v_caches, self.meta = k_caches, v_caches, meta

    def forward(self, layer, q, k, v, scale, window):
        meta = self.meta
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        d = k_cache.shape[-1]
        k_cache.view(-1, d).index_copy_(0, meta.write_rows, k.reshape(-1, d).to(k_cache.dtype))
        v_cache.view(-1, d).index_copy_(0, meta.write_rows, v.reshape(-1, d).to(v_cache.dtype))
        if meta.all_decode:
            return self._decode(q, k_cache, v_cache, scale, window).to(q.dtype)
        out = torch.empty_like(q)
        if meta.decode_rows.numel():
            out[meta.decode_rows] = self._decode(q[meta.decode_rows], k_cache, v_cache, scale, window).to(
                q.dtype
            )
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_queries)
            qs = q[rows].transpose(0, 1)[None]  # [1, H, Q, D]
            if chunk.gather is None:  # no context: the chunk's own keys are all there is
                ks, vs = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
            else:
                ks = _gather(k_cache, chunk.gather, 1, chunk.num_keys).to(q.dtype)
                vs = _gather(v_cache, chunk.gather, 1, chunk.num_keys).to(q.dtype)
            q_len, s = chunk.num_queries, chunk.num_keys
            mask = None if (q_len == s and window is None) else causal_mask(q_len, s, window, q.device)
            out[rows] = sdpa(qs, ks, vs, scale, mask)[0].transpose(0, 1)
        return out

    def _decode(self, q, k_cache, v_cache, scale, window):
        meta = self.meta
        n = q.shape[0]
        ks = _gather(k_cache, meta.decode_gather, n).to(q.dtype)  # [N, K, S_max, D]
        vs = _gather(v_cache, meta.decode_gather, n).to(q.dtype)
        if window is None:
            mask = meta.decode_bias(q.dtype)  # [N, 1, 1, S] additive, shared by every layer
        else:
            key_pos = torch.arange(meta.decode_valid.shape[1], device=q.device)[None, :]
            valid = meta.decode_valid & (key_pos > meta.decode_positions[:, None] - window)
            mask = valid[:, None, None, :]
        out = sdpa(q[:, :, None, :], ks, vs, scale, mask)  # [N, H, 1, D]
        return out[:, :, 0, :]


def _gather(cache: torch.Tensor, rows: torch.Tensor, n: int, num_keys: int | None = None) -> torch.Tensor:
    """Gather (block, head) rows of B keys into [n, K, S, D] (S cut to num_keys when given)."""
    heads, bs, dim = cache.shape[1:]
    out = cache.view(-1, bs, dim).index_select(0, rows).view(n, heads, -1, dim)
    return out if num_keys is None else out[:, :, :num_keys]
