"""KVCacheManager: a request's view of the block pool.

  computed_prefix(req)        cached blocks covering the longest known prefix of the prompt
  allocate_slots(req, n, pre) blocks for n more tokens (after taking `pre`); False if the pool is short
  cache_full_blocks(req)      publish newly completed full blocks under their chain keys
  free(req)                   drop all of the request's blocks (tail first, so tails evict first)

Block table layout: request.block_ids[i] holds token positions [i*B, (i+1)*B).
"""

from __future__ import annotations

from collections.abc import Callable

from shared.core.kv_hash import BlockKey, chain_keys, kv_extras
from shared.engine.block_pool import BlockPool
from shared.engine.request import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, model_extras: tuple[str, str], enable_prefix_caching: bool = True):
        self.pool = pool
        self.block_size = pool.block_size
        self.model_id, self.layout = model_extras
        self.enable_prefix_caching = enable_prefix_caching
        #: optional (request, cached blocks) -> the leading blocks it may use (an expert-parallel
        #: group keeps only blocks held by the shard the request runs on)
        self.prefix_filter: Callable[[Request, list[int]], list[int]] | None = None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_keys(self, request: Request) -> list[BlockKey]:
        """Chain keys of the request's full blocks (computed on demand, cached on the request)."""
        return self._keys(request)

    def _keys(self, request: Request) -> list[BlockKey]:
        extras = kv_extras(self.model_id, self.layout, request.lora, request.params.cache_salt)
        request.block_keys = chain_keys(request.all_token_ids, self.block_size, extras, request.block_keys)
        return request.block_keys

    def computed_prefix(self, request: Request) -> list[int]:
        """Cached blocks for the request's leading full blocks; at least one token is left to compute
        so the last position's logits exist."""
        if not self.enable_prefix_caching:
            return []
        usable = (request.num_tokens - 1) // self.block_size
        blocks = self.pool.lookup(self._keys(request)[:usable])
        return self.prefix_filter(request, blocks) if self.prefix_filter and blocks else blocks

    def allocate_slots(self, request: Request, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        have = len(request.block_ids) + len(prefix)
        computed = request.num_computed_tokens + len(prefix) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - have
        # Prefix blocks that are free right now count against the free list once taken.
        free_prefix = sum(1 for b in prefix if self.pool.ref_counts[b] == 0)
        if need > 0 and not self.pool.can_allocate(need + free_prefix):
            return False
        if prefix:
            self.pool.acquire(list(prefix))
            request.block_ids.extend(prefix)
        if need > 0:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        if full <= request.published_blocks:  # (most decode steps: no block completed)
            return
        keys = self._keys(request)
        for i in range(request.published_blocks, min(full, len(keys))):
            self.pool.cache(request.block_ids[i], keys[i])
        request.published_blocks = min(full, len(keys))

    def free(self, request: Request) -> None:
        self.pool.release(list(reversed(request.block_ids)))
        request.block_ids = []
        request.published_blocks = 0
