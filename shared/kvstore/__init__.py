"""The remote KV-cache store's core: content-addressed KV blocks in a memory tier (byte budget, LRU)
over an optional Redis tier, with leases that pin blocks during a handoff."""

from shared.kvstore.store import BlockMeta, KVStore, StoreError

__all__ = ["BlockMeta", "KVStore", "StoreError"]
