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
On CPU with float32 or float16 caches both kinds go to Tandem's compiled kernels (shared/kernels:
`paged_decode_attention` and `paged_prefill_attention` read the keys and values straight from the
blocks, no gather, no padding); a fused GPU kernel (FlashAttention / FlashInfer) would take the same
metadata. The PyTorch code here is the portable reference and what runs anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from shared.models.attention import causal_mask, sdpa

# cache dtypes the CPU kernels read (rows convert to float32 as they load)
KERNEL_KV_DTYPES = (torch.float32, torch.float16)


@dataclass
class PrefillChunk:
    start: int  # first row in the flat batch
    num_queries: int
    num_keys: int  # tokens of the sequence up to the chunk's end (context + chunk)
    table: list[int]  # the sequence's blocks up to the chunk's end


@dataclass
class PagedMetadata:
    """One step's view of the cache. The decodes' index tensors for the PyTorch path (gather rows,
    validity mask) are derived on first use, so a step run by the CPU kernels never builds them."""

    slots: torch.Tensor  # [T] cache slot (block * B + offset) of each new token
    decode_rows: torch.Tensor  # [N] rows of the decodes in the flat batch
    decode_tables: torch.Tensor  # [N, max_blocks] block ids (padded with 0)
    decode_lens: torch.Tensor  # [N] keys of each decode, its own token included
    prefills: list[PrefillChunk]
    block_size: int
    num_kv_heads: int
    all_decode: bool = False  # every row is a decode (the common steady state)
    kernels: object | None = None  # torch.ops.tandem when the CPU kernels serve this step

    @cached_property
    def write_rows(self) -> torch.Tensor:
        """[T * K] row of [num_blocks * K * B, D] for each new token's head."""
        bs, heads = self.block_size, self.num_kv_heads
        block, offset = self.slots // bs, self.slots % bs
        head = torch.arange(heads, device=self.slots.device)[None, :]
        return ((block[:, None] * heads + head) * bs + offset[:, None]).reshape(-1)

    def gather_rows(self, tables: torch.Tensor) -> torch.Tensor:
        """[N, blocks] block tables -> their (block, head) rows of [num_blocks * K, B, D], in
        (sequence, head, block) order: gathered, each sequence's keys as one [K, S, D]."""
        heads = torch.arange(self.num_kv_heads, device=tables.device)[None, :, None]
        return (tables[:, None, :] * self.num_kv_heads + heads).reshape(-1)

    @cached_property
    def decode_gather(self) -> torch.Tensor:
        return self.gather_rows(self.decode_tables)

    @cached_property
    def decode_valid(self) -> torch.Tensor:
        """[N, max_blocks * B] bool: which gathered keys are real."""
        keys = self.decode_tables.shape[1] * self.block_size
        return torch.arange(keys, device=self.decode_lens.device)[None, :] < self.decode_lens[:, None]

    @cached_property
    def decode_positions(self) -> torch.Tensor:
        return self.decode_lens - 1

    _bias: dict = field(default_factory=dict)

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """decode_valid as an additive mask [N, 1, 1, S] (0 or -inf), made once per step."""
        if dtype not in self._bias:
            bias = torch.zeros(self.decode_valid.shape, dtype=dtype, device=self.decode_valid.device)
            self._bias[dtype] = bias.masked_fill_(~self.decode_valid, float("-inf"))[:, None, None, :]
        return self._bias[dtype]


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
        kernels = meta.kernels if q.dtype == torch.float32 and k_cache.dtype in KERNEL_KV_DTYPES else None
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_queries)
            if kernels is not None:  # causal, straight from the blocks (the chunk's K/V written above)
                table = torch.tensor(chunk.table, dtype=torch.long)
                out[rows] = kernels.paged_prefill_attention(
                    q[rows], k_cache, v_cache, table, chunk.num_keys, scale, window or -1
                )
                continue
            qs = q[rows].transpose(0, 1)[None]  # [1, H, Q, D]
            if chunk.num_keys == chunk.num_queries:  # no context: the chunk's own keys are all there is
                ks, vs = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
            else:
                gather = meta.gather_rows(torch.tensor([chunk.table], device=q.device))
                ks = _gather(k_cache, gather, 1, chunk.num_keys).to(q.dtype)
                vs = _gather(v_cache, gather, 1, chunk.num_keys).to(q.dtype)
            q_len, s = chunk.num_queries, chunk.num_keys
            mask = None if (q_len == s and window is None) else causal_mask(q_len, s, window, q.device)
            out[rows] = sdpa(qs, ks, vs, scale, mask)[0].transpose(0, 1)
        return out

    def _decode(self, q, k_cache, v_cache, scale, window):
        meta = self.meta
        if meta.kernels is not None and q.dtype == torch.float32:
            return meta.kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale, window or -1
            )
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
