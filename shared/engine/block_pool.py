"""BlockPool: fixed-size KV blocks with reference counts and a prefix cache.

A block is free when no request references it. Free blocks wait in an LRU queue; a free block that
still holds a full, hashed block of some earlier request stays findable by its key until it is
evicted, which happens only when it is handed out again (oldest first). So finished requests leave
their prefixes behind for free, and the cache never costs a running request a block.

Verbs come in pairs and report failure as return values:
  can_allocate(n) / allocate(n) -> list[int] | None      fresh blocks (evicting cached ones if needed)
  lookup(keys) -> list[int]                               longest cached prefix, without taking it
  acquire(block_ids) / release(block_ids)                 take / drop a reference
  cache(block_id, key)                                    make a full block findable by key

With `record_events()` the pool also logs what becomes findable and what is evicted —
("stored", key) / ("removed", key) — for routers that track which worker caches which prefix;
`drain_events()` takes the log.
"""

from __future__ import annotations

from collections import OrderedDict

from shared.core.kv_hash import BlockKey


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hits = 0  # blocks served from the cache, for metrics
        self.evictions = 0
        self.events: list[tuple[str, BlockKey]] | None = None

    def record_events(self) -> None:
        if self.events is None:
            self.events = []

    def drain_events(self) -> list[tuple[str, BlockKey]]:
        events, self.events = self.events or [], ([] if self.events is not None else None)
        return events

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_queue)

    def allocate(self, n: int) -> list[int] | None:
        if not self.can_allocate(n):
            return None
        ids = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)  # least recently freed first
            self._forget(block)
            self.ref_counts[block] = 1
            ids.append(block)
        return ids

    def lookup(self, keys: list[BlockKey]) -> list[int]:
        found = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def acquire(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
        self.hits += len(block_ids)

    def release(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} released more often than acquired")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None

    def cache(self, block_id: int, key: bytes) -> None:
        if self.block_key[block_id] is not None:
            return
        if key in self.cached:  # another block already holds the same content; keep the first
            return
        self.block_key[block_id] = key
        self.cached[key] = block_id
        if self.events is not None:
            self.events.append(("stored", key))

    def reset_cache(self) -> None:
        """Forget every cached prefix of free blocks (e.g. after new weights are loaded)."""
        for b in list(self.free_queue):
            self._forget(b)

    def _forget(self, block: int) -> None:
        key = self.block_key[block]
        if key is not None:
            self.evictions += 1
            del self.cached[key]
            self.block_key[block] = None
            if self.events is not None:
                self.events.append(("removed", key))
