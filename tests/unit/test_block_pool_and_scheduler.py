"""Block pool, KV cache manager and scheduler with fake requests: no model, milliseconds."""

from __future__ import annotations

from shared.core.sampling_params import SamplingParams
from shared.engine.block_pool import BlockPool
from shared.engine.kv_cache_manager import KVCacheManager
from shared.engine.request import Request, RequestStatus
from shared.engine.scheduler import Scheduler, SchedulerConfig


def _req(rid, n, priority=0, tokens=None):
    return Request(rid, tokens or list(range(100, 100 + n)), SamplingParams(max_tokens=8, priority=priority))


def _sched(num_blocks=8, block_size=4, **kw):
    pool = BlockPool(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**kw), KVCacheManager(pool, ("m", "layout"))), pool


def _run(sched, out):
    """Pretend the model ran: advance counters; requests that finished their tokens get one more."""
    for r, n in out.scheduled:
        r.num_computed_tokens += n
        sched.kv.cache_full_blocks(r)
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(7)


def test_pool_allocate_release_and_lru_eviction():
    pool = BlockPool(3, 4)
    a = pool.allocate(2)
    pool.cache(a[0], b"k0")
    pool.cache(a[1], b"k1")
    assert pool.allocate(2) is None and not pool.can_allocate(2)
    pool.release([a[1], a[0]])  # freed tail first
    assert pool.num_free == 3 and pool.lookup([b"k0", b"k1"]) == a
    pool.allocate(2)  # free block 2 first, then a[1] (freed before a[0]) is evicted
    assert pool.lookup([b"k0"]) == [a[0]] and pool.lookup([b"k1"]) == []
    assert pool.evictions == 1


def test_acquire_cached_block_takes_it_off_the_free_list():
    pool = BlockPool(2, 4)
    (b,) = pool.allocate(1)
    pool.cache(b, b"k")
    pool.release([b])
    pool.acquire(pool.lookup([b"k"]))
    assert pool.ref_counts[b] == 1 and pool.num_free == 1 and pool.hits == 1


def test_chunked_prefill_respects_budget_and_decodes_first():
    sched, _ = _sched(num_blocks=32, max_num_batched_tokens=6, long_prefill_chunk=4)
    a = _req("a", 3)
    sched.add(a)
    _run(sched, sched.schedule())  # a: 3 prompt tokens -> one output
    b = _req("b", 10)
    sched.add(b)
    out = sched.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 4)]
    assert out.num_tokens <= 6


def test_prefix_hit_skips_cached_blocks_and_leaves_one_token():
    sched, pool = _sched(num_blocks=16, block_size=4)
    first = _req("a", 8, tokens=list(range(8)))
    sched.add(first)
    _run(sched, sched.schedule())
    sched.finish(first, RequestStatus.FINISHED_STOPPED)
    same = _req("b", 8, tokens=list(range(8)))  # identical prompt: one block must still be computed
    sched.add(same)
    out = sched.schedule()
    assert same.num_cached_tokens == 4 and out.scheduled == [(same, 4)]


def test_preemption_frees_lowest_priority_latest_and_it_resumes_first():
    sched, pool = _sched(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a, b = _req("a", 8), _req("b", 8)
    sched.add(a)
    sched.add(b)
    _run(sched, sched.schedule())  # both prefilled: 2 blocks each, pool full
    out = sched.schedule()  # both need a third block: b (later) is preempted
    assert out.preempted == [b] and b.status is RequestStatus.PREEMPTED and not b.block_ids
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    _run(sched, out)
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    out = sched.schedule()
    assert out.scheduled[0][0] is b and pool.num_free + len(b.block_ids) == 4


def test_priority_orders_waiting_queue():
    sched, _ = _sched(num_blocks=64, max_num_seqs=1)
    low, high = _req("low", 4, priority=5), _req("high", 4, priority=-1)
    sched.add(low)
    sched.add(high)
    assert sched.schedule().scheduled[0][0] is high


def test_finish_returns_blocks_from_any_state():
    sched, pool = _sched(num_blocks=8)
    a, b = _req("a", 5), _req("b", 30)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert pool.num_free == 8 and not sched.has_unfinished()


def test_pool_events_name_what_becomes_findable_and_what_is_evicted():
    pool = BlockPool(2, 4)
    assert pool.drain_events() == []  # off until asked for
    pool.record_events()
    a, b = pool.allocate(2)
    pool.cache(a, b"ka")
    pool.cache(b, b"ka")  # same content already cached: no second event
    pool.release([a, b])
    assert pool.drain_events() == [("stored", b"ka")]
    pool.allocate(2)  # hands out the cached block again: its key is forgotten
    assert pool.drain_events() == [("removed", b"ka")] and pool.drain_events() == []
