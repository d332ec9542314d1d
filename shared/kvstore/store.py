"""KVStore: content-addressed KV blocks, a memory tier over an optional Redis tier.

A block is stored under its chain key (shared/core/kv_hash.py), with a header naming its KV layout,
dtype and shape, and its payload as raw bytes. Tiers:

  memory   an LRU dict within a byte budget; a put evicts least recently used blocks that are not
           pinned. Hits move a block to the front.
  redis    optional (`redis://` URL). Every put is written through, so a block evicted from memory is
           still served (and promoted back to memory), and a store restarted on the same Redis finds
           its blocks again. Values are `header length (4 bytes, little endian) | JSON header | bytes`.
           A Redis that fails (down, timing out) does not fail the store: it goes on with its memory
           tier, reports itself `degraded`, and tries Redis again every REDIS_RETRY_S seconds.

Leases pin blocks for a handoff: `lease(keys, ttl)` keeps those blocks from being evicted until the
lease is released or its TTL passes (a decode that never comes cannot leak them). Expired leases are
swept on every operation.

Errors are StoreError with a `kind` the gRPC service maps to a status: "not_found", "layout"
(the block has another layout than asked for), "full" (pinned blocks fill the budget), "invalid".
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass

from shared.core.dtypes import ITEM_BYTES
from shared.core.kv_hash import BlockKey

REDIS_PREFIX = b"tandem:kv:"
MAX_LEASE_TTL = 3600.0  # seconds a handoff may pin its blocks
REDIS_TTL = 7 * 24 * 3600  # seconds a block stays in Redis after its last put
REDIS_RETRY_S = 5.0  # after a Redis failure, the store uses its memory tier alone this long
log = logging.getLogger("tandem.kvstore")


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class StoreError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class BlockMeta:
    layout: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BlockMeta:
        d = json.loads(raw)
        return cls(d["layout"], d["dtype"], tuple(d["shape"]))


class KVStore:
    def __init__(
        self,
        memory_bytes: int,
        redis_url: str | None = None,
        clock=time.monotonic,
        redis_password: str | None = None,
        redis_ttl: int = REDIS_TTL,
    ):
        if memory_bytes < 0:
            raise ValueError(f"memory budget must be non-negative, got {memory_bytes}")
        self.memory_bytes = memory_bytes
        self.redis_ttl = redis_ttl
        self.clock = clock
        self.memory: OrderedDict[BlockKey, tuple[BlockMeta, bytes]] = OrderedDict()
        self.used = 0
        self.leases: dict[str, tuple[float, tuple[bytes, ...]]] = {}  # id -> (expiry, keys)
        self.pins: dict[bytes, int] = {}
        self.lock = threading.Lock()
        self.counters = {"puts": 0, "gets": 0, "memory_hits": 0, "redis_hits": 0, "misses": 0, "evictions": 0,
                         "memory_bytes_read": 0, "redis_bytes_read": 0, "bytes_written": 0,
                         "lease_expiries": 0, "redis_errors": 0}  # fmt: skip
        self.redis = None
        self.redis_down_until = float("-inf")  # a failed Redis is left alone until then
        if redis_url:
            import redis

            extra = {"password": redis_password} if redis_password else {}
            # a Redis that hangs must not hang the store (its calls hold the store's lock)
            self.redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5, **extra)
            try:
                self.redis.ping()
            except redis.RedisError as e:
                raise StoreError("invalid", f"cannot reach Redis at {redact(redis_url)}: {e}") from e

    # -- blocks ----------------------------------------------------------------------------------

    def put(self, key: bytes, meta: BlockMeta, data: bytes) -> None:
        expected = _nbytes(meta)
        if len(data) != expected:
            raise StoreError(
                "invalid", f"block payload is {len(data)} bytes; {meta.dtype} {meta.shape} needs {expected}"
            )
        with self.lock:
            self._sweep()
            self.counters["puts"] += 1
            self.counters["bytes_written"] += len(data)
        if self._redis_up():  # (Redis I/O outside the lock: a slow Redis must not stall memory hits)
            header = meta.to_json()
            value = struct.pack("<I", len(header)) + header + data
            self._redis(lambda r: r.set(REDIS_PREFIX + key, value, ex=self.redis_ttl))  # entries expire
        with self.lock:
            self._remember(key, meta, data)

    def get(self, key: BlockKey, layout: str | None = None) -> tuple[BlockMeta, bytes]:
        with self.lock:
            self._sweep()
            self.counters["gets"] += 1
            found = self.memory.get(key)
            if found is not None:
                self.memory.move_to_end(key, last=False)
                self.counters["memory_hits"] += 1
                self.counters["memory_bytes_read"] += len(found[1])
        if found is None:
            raw = self._redis(lambda r: r.get(REDIS_PREFIX + key)) if self._redis_up() else None
            with self.lock:
                if raw is None:
                    self.counters["misses"] += 1
                    raise StoreError("not_found", f"block {key.hex()[:16]}… is not in the store")
                (n,) = struct.unpack_from("<I", raw)
                found = (BlockMeta.from_json(raw[4 : 4 + n]), raw[4 + n :])
                self.counters["redis_hits"] += 1
                self.counters["redis_bytes_read"] += len(found[1])
                self._remember(key, *found)
        meta, data = found
        if layout is not None and meta.layout != layout:
            raise StoreError("layout", f"block {key.hex()[:16]}… has layout '{meta.layout}', not '{layout}'")
        return meta, data

    def lookup(self, keys: list[BlockKey]) -> tuple[int, int]:
        """How many leading keys are present: (in memory, in memory or Redis)."""
        with self.lock:
            self._sweep()
            in_memory = 0
            while in_memory < len(keys) and keys[in_memory] in self.memory:
                in_memory += 1
            rest = keys[in_memory:]
            held = {k for k in rest if k in self.memory}
        anywhere = in_memory
        if rest and self._redis_up():

            def exists(r):
                pipe = r.pipeline()
                for k in rest:
                    pipe.exists(REDIS_PREFIX + k)
                return pipe.execute()

            found = self._redis(exists) or [False] * len(rest)
            for k, present in zip(rest, found, strict=True):
                if not present and k not in held:
                    break
                anywhere += 1
        return in_memory, anywhere

    def delete(self, keys: list[BlockKey]) -> int:
        with self.lock:
            deleted = 0
            for key in keys:
                if key in self.memory:
                    self.used -= len(self.memory.pop(key)[1])
                    deleted += 1
        if keys and self._redis_up():
            deleted = max(
                deleted, int(self._redis(lambda r: r.delete(*(REDIS_PREFIX + k for k in keys))) or 0)
            )
        return deleted

    def clear_memory(self) -> None:
        """Drop the memory tier (Redis keeps its copy); leases stay."""
        with self.lock:
            self.memory.clear()
            self.used = 0

    # -- leases ----------------------------------------------------------------------------------

    def lease(self, keys: list[BlockKey], ttl: float) -> tuple[str, int]:
        """Pin the longest prefix of `keys` that the memory tier holds, for `ttl` seconds; returns (lease
        id, length of that prefix). A handoff names only the pinned blocks and sends the rest inline:
        a block after a gap (or only in Redis) could be gone by the time the decode worker reads it."""
        if not 0 < ttl <= MAX_LEASE_TTL:  # also NaN: a lease that never ends would pin blocks forever
            raise StoreError("invalid", f"lease ttl must be in (0, {MAX_LEASE_TTL}] seconds, got {ttl}")
        with self.lock:
            self._sweep()
            present = tuple(itertools.takewhile(self.memory.__contains__, keys))
            lease_id = uuid.uuid4().hex
            self.leases[lease_id] = (self.clock() + ttl, present)
            for k in present:
                self.pins[k] = self.pins.get(k, 0) + 1
            return lease_id, len(present)

    def release(self, lease_id: str) -> bool:
        with self.lock:
            return self._drop_lease(lease_id)

    @property
    def pinned(self) -> int:
        with self.lock:
            self._sweep()
            return len(self.pins)

    def stats(self) -> dict:
        if self._redis_up():  # a quiet store still notices a lost Redis
            self._redis(lambda r: r.ping())
        with self.lock:
            self._sweep()
            return {
                **self.counters,
                "memory_blocks": len(self.memory),
                "memory_bytes": self.used,
                "memory_budget": self.memory_bytes,
                "pinned_blocks": len(self.pins),
                "leases": len(self.leases),
                "redis": self.redis is not None,
                "degraded": self.redis is not None and not self._redis_up(),
            }

    # -- Redis (called without the lock: a slow Redis must not stall the memory tier) -----------

    def _redis_up(self) -> bool:
        return self.redis is not None and self.clock() >= self.redis_down_until

    def _redis(self, call):
        """call(redis client), or None when Redis fails: then the store carries on with its memory
        tier (degraded) and leaves Redis alone for REDIS_RETRY_S seconds."""
        import redis

        try:
            return call(self.redis)
        except redis.RedisError as e:
            with self.lock:
                self.counters["redis_errors"] += 1
                self.redis_down_until = self.clock() + REDIS_RETRY_S
            log.warning(
                "Redis failed (%s); serving from the memory tier, retrying in %.0f s", e, REDIS_RETRY_S
            )
            return None

    # -- internals (lock held) -------------------------------------------------------------------

    def _remember(self, key: bytes, meta: BlockMeta, data: bytes) -> None:
        if key in self.memory:
            self.memory.move_to_end(key, last=False)
            return
        if len(data) > self.memory_bytes:
            if not self._redis_up():
                raise StoreError(
                    "full", f"a {len(data)}-byte block exceeds the memory budget of {self.memory_bytes}"
                )
            return  # Redis holds it
        need = self.used + len(data) - self.memory_bytes
        if need > 0:
            for victim in reversed(list(self.memory)):
                if need <= 0:
                    break
                if victim in self.pins:
                    continue
                freed = len(self.memory.pop(victim)[1])
                need -= freed
                self.used -= freed
                self.counters["evictions"] += 1
            if self.used + len(data) > self.memory_bytes:
                if not self._redis_up():
                    raise StoreError("full", "the memory tier is full of pinned blocks")
                return
        self.memory[key] = (meta, data)
        self.memory.move_to_end(key, last=False)
        self.used += len(data)

    def _drop_lease(self, lease_id: str) -> bool:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        for k in lease[1]:
            left = self.pins.get(k, 0) - 1
            if left > 0:
                self.pins[k] = left
            else:
                self.pins.pop(k, None)
        return True

    def _sweep(self) -> None:
        now = self.clock()
        for lease_id in [i for i, (expiry, _) in self.leases.items() if expiry <= now]:
            self._drop_lease(lease_id)
            self.counters["lease_expiries"] += 1


def _nbytes(meta: BlockMeta) -> int:
    if meta.dtype not in ITEM_BYTES:
        raise StoreError("invalid", f"unknown dtype '{meta.dtype}' (known: {sorted(ITEM_BYTES)})")
    n = ITEM_BYTES[meta.dtype]
    for d in meta.shape:
        if d < 0:
            raise StoreError("invalid", f"negative dimension in shape {meta.shape}")
        n *= d
    return n
