"""Scheduler: which requests run this step, and how many of their tokens.

One token budget per step (`max_num_batched_tokens`) is shared by decodes and prefill chunks, so long
prompts are chunked (at most `long_prefill_chunk` tokens a step) while running requests keep
decoding. Order: running requests first (in arrival order), then waiting ones by (priority, arrival).
When blocks run out, the running request that sorts last (lowest priority, latest arrival) is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed — its
finished full blocks usually survive in the prefix cache, so recompute is mostly cache hits.
No new request is admitted in a step that preempted, so a preempted request is the first to resume:
with equal priorities nothing starves.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from shared.engine.kv_cache_manager import KVCacheManager
from shared.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_chunk: int = 512


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []  # sorted by sort_key
        self.running: list[Request] = []  # arrival order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for request in list(self.running):
            if request not in self.running:  # preempted earlier in this loop
                continue
            n = self._tokens_to_run(request, budget)
            if n == 0:
                continue
            if self._allocate_or_preempt(request, n, out):
                out.scheduled.append((request, n))
                budget -= n
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        return out

    def _tokens_to_run(self, request: Request, budget: int) -> int:
        """A decoding request's drafts (speculative decoding) run with its last token, as many as fit."""
        drafts = len(request.spec_token_ids)
        n = request.num_tokens - request.num_computed_tokens + drafts
        n = min(n, budget, self.config.long_prefill_chunk)
        if drafts and n < 1 + drafts:
            del request.spec_token_ids[max(0, n - 1) :]
            if request.spec_probs is not None:
                request.spec_probs = request.spec_probs[: len(request.spec_token_ids)]
        return n

    def _allocate_or_preempt(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(request, n):
            victim = max(self.running, key=lambda r: r.sort_key)
            self._preempt(victim)
            out.preempted.append(victim)
            out.scheduled = [(r, k) for r, k in out.scheduled if r is not victim]
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            # Only a request that arrives with imported KV waits with tokens already computed.
            imported = request.num_computed_tokens
            prefix = self.kv.computed_prefix(request) if not imported else []
            cached = imported or len(prefix) * self.kv.block_size
            n = min(request.num_tokens - cached, budget, self.config.long_prefill_chunk)
            if not self.kv.allocate_slots(request, n, prefix):
                break
            self.waiting.pop(0)
            request.num_computed_tokens = cached
            if request.scheduled_at is None:
                request.scheduled_at = time.monotonic()
            if not request.ever_scheduled:
                request.num_cached_tokens = cached
                request.ever_scheduled = True
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, n))
            budget -= n
        return budget

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        self.num_preemptions += 1
        request.num_computed_tokens = 0
        request.spec_token_ids, request.spec_probs = [], None
        request.status = RequestStatus.PREEMPTED
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) and return its blocks to the pool."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.block_ids:
            self.kv.free(request)
        request.status = status
