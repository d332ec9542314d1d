"""The KV store core: blocks by key with their layout, LRU within a byte budget, pins and leases that
expire, lookups of leading blocks, and the Redis tier behind memory (a real redis-server)."""

from __future__ import annotations

import pytest
import redis

from shared.kvstore import BlockMeta, KVStore, StoreError

META = BlockMeta("float32/2L/1x4/B2", "float32", (2, 2, 1, 2, 4))  # 32 values = 128 bytes
SIZE = 128


def block(i: int) -> bytes:
    return bytes([i % 256]) * SIZE


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_put_get_and_bad_input():
    store = KVStore(10 * SIZE)
    store.put(key(1), META, block(1))
    assert store.get(key(1)) == (META, block(1))
    assert store.get(key(1), META.layout)[1] == block(1)
    with pytest.raises(StoreError, match="layout") as e:
        store.get(key(1), "bfloat16/2L/1x4/B2")
    assert e.value.kind == "layout"
    with pytest.raises(StoreError, match="not in the store") as e:
        store.get(key(2))
    assert e.value.kind == "not_found"
    with pytest.raises(StoreError, match="needs 128"):
        store.put(key(3), META, b"\0" * 100)
    with pytest.raises(StoreError, match="unknown dtype"):
        store.put(key(3), BlockMeta("x", "int3", (1,)), b"\0")


def test_lru_within_the_budget_and_lookup():
    store = KVStore(3 * SIZE)
    for i in range(3):
        store.put(key(i), META, block(i))
    store.get(key(0))  # 0 is now the most recently used; 1 the least
    store.put(key(3), META, block(3))
    assert store.lookup([key(0), key(1)]) == (1, 1)
    assert store.lookup([key(2), key(3), key(0)]) == (3, 3)
    assert store.stats()["evictions"] == 1 and store.stats()["memory_bytes"] == 3 * SIZE
    assert store.delete([key(2), key(9)]) == 1 and store.lookup([key(2)]) == (0, 0)


def test_leases_pin_until_released_or_expired():
    clock = Clock()
    store = KVStore(2 * SIZE, clock=clock)
    store.put(key(0), META, block(0))
    store.put(key(1), META, block(1))
    assert store.lease([key(7), key(0)], ttl=5.0)[1] == 0  # a prefix: nothing after a missing block
    assert store.release(store.lease([key(0), key(7), key(1)], ttl=5.0)[0]) and store.pinned == 0
    lease, pinned = store.lease([key(0), key(1), key(7)], ttl=5.0)
    assert pinned == 2 and store.pinned == 2
    with pytest.raises(StoreError, match="pinned") as e:
        store.put(key(2), META, block(2))  # nothing evictable, no Redis to fall back on
    assert e.value.kind == "full"
    assert store.release(lease) and not store.release(lease) and store.pinned == 0
    store.lease([key(0)], ttl=5.0)
    clock.now = 6.0  # the decode never came: the lease lapses
    assert store.pinned == 0
    store.put(key(2), META, block(2))
    with pytest.raises(StoreError, match="ttl"):
        store.lease([key(0)], ttl=0)


def test_redis_tier_serves_evicted_blocks_and_survives_a_restart(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    store = KVStore(2 * SIZE, redis_url)
    for i in range(4):
        store.put(key(i), META, block(i))
    assert store.lookup([key(i) for i in range(4)]) == (0, 4)  # 0 and 1 left memory, not the store
    assert store.get(key(0), META.layout) == (META, block(0))
    assert store.stats()["redis_hits"] == 1
    store.clear_memory()
    assert store.get(key(3))[1] == block(3) and store.stats()["redis_hits"] == 2
    restarted = KVStore(2 * SIZE, redis_url)
    assert restarted.lookup([key(0), key(1), key(2), key(3)]) == (0, 4)
    assert restarted.get(key(2)) == (META, block(2))
    assert restarted.delete([key(2)]) == 1
    with pytest.raises(StoreError):
        restarted.get(key(2))


def test_unreachable_redis_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot reach Redis at redis://127.0.0.1:1"):
        KVStore(SIZE, "redis://127.0.0.1:1/0")


def test_a_password_protected_redis_tier_takes_the_password_apart_from_the_url(tmp_path):
    """The Helm chart's Redis requires a password; it reaches the store as TANDEM_REDIS_PASSWORD."""
    from tests.redis_server import start_redis

    proc, url = start_redis(tmp_path, password="s3cret-pw")
    try:
        with pytest.raises(StoreError, match="cannot reach Redis"):
            KVStore(SIZE, url)  # no password: refused at start, not at the first block
        store = KVStore(0, url, redis_password="s3cret-pw")  # no memory tier: every block goes to Redis
        store.put(key(1), META, block(1))
        assert store.get(key(1)) == (META, block(1))
        assert redis.Redis.from_url(url, password="s3cret-pw").dbsize() == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_lease_ttls_are_bounded_and_redis_entries_expire(redis_url):
    """A NaN, infinite or day-long lease would pin blocks for ever; Redis is a cache, so its entries
    carry a TTL; a password in the Redis URL never reaches an error message."""
    store = KVStore(4 * SIZE, redis_url, redis_ttl=120)
    store.put(key(7), META, block(7))
    for ttl in (float("nan"), float("inf"), 0, -1, 86_400):
        with pytest.raises(StoreError, match="lease ttl must be in"):
            store.lease([key(7)], ttl)
    assert store.pinned == 0
    from shared.kvstore.store import REDIS_PREFIX

    assert 0 < redis.Redis.from_url(redis_url).ttl(REDIS_PREFIX + key(7)) <= 120
    with pytest.raises(StoreError) as e:
        KVStore(SIZE, "redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(e.value) and "redis://:***@127.0.0.1:1/0" in str(e.value)


def test_a_lost_redis_leaves_the_memory_tier_serving_and_the_store_degraded(tmp_path):
    """Redis stops under a running store: puts, gets, lookups and deletes go on in memory, the store
    says it is degraded and counts the failures, and it tries Redis again after REDIS_RETRY_S."""
    from shared.kvstore.store import REDIS_RETRY_S
    from tests.redis_server import start_redis

    proc, url = start_redis(tmp_path)
    clock = Clock()
    try:
        store = KVStore(4 * SIZE, url, clock=clock)
        store.put(key(0), META, block(0))
        assert not store.stats()["degraded"]
    finally:
        proc.kill()
        proc.wait()
    store.put(key(1), META, block(1))  # Redis is gone: memory takes it
    assert store.stats()["degraded"] and store.stats()["redis_errors"] == 1
    assert store.get(key(0))[1] == block(0) and store.get(key(1))[1] == block(1)
    assert store.lookup([key(0), key(1), key(2)]) == (2, 2)
    with pytest.raises(StoreError, match="not in the store"):
        store.get(key(2))
    assert store.delete([key(1)]) == 1
    assert store.stats()["redis_errors"] == 1  # left alone while in its retry window
    clock.now += REDIS_RETRY_S
    assert store.stats()["degraded"] and store.stats()["redis_errors"] == 2  # tried again: still down


def test_a_hung_redis_does_not_stall_the_memory_tier(tmp_path):
    """Redis I/O happens outside the store's lock: while one caller waits on a frozen Redis (SIGSTOP),
    memory hits for others answer at once."""
    import signal
    import threading
    import time

    from tests.redis_server import start_redis

    proc, url = start_redis(tmp_path)
    try:
        store = KVStore(4 * SIZE, url)
        store.put(key(0), META, block(0))
        proc.send_signal(signal.SIGSTOP)
        stuck = threading.Thread(target=lambda: pytest.raises(StoreError, store.get, key(9)))
        stuck.start()  # waits on Redis (up to its socket timeout)
        time.sleep(0.3)
        t = time.perf_counter()
        assert store.get(key(0))[1] == block(0) and store.lookup([key(0)]) == (1, 1)
        assert time.perf_counter() - t < 0.5 and stuck.is_alive()
        proc.send_signal(signal.SIGCONT)
        stuck.join(30)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
