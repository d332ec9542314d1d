"""Where a request runs: the router's policies and its disaggregation decision, as pure functions of
what the router knows about its workers (a WorkerView each) — no I/O but the one KV-store lookup the
caller passes in, so they are tested with fakes (tests/services/test_router_placement.py).

Policies pick among candidate workers:
  round_robin    in turn (decode and prefill picks take separate turns)
  least_loaded   fewest requests running there (counted by the router as they start and end)
  prefix_aware   the worker holding the longest prefix of the prompt, unless its load exceeds the
                 least loaded candidate's by more than `balance_threshold` requests — then the least
                 loaded (affinity must not pile everything on one overloaded worker)

Disaggregation: the decode worker is picked among monolithic/decode workers (prefill workers only
when no other is up). If a prefill worker is healthy and the part of the prompt that neither the
decode worker nor the KV store holds is longer than `disagg_threshold` tokens, a prefill worker
(picked by the same policy) prefills it and hands the KV over; otherwise the decode worker prefills
locally.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.core.kv_hash import BlockKey

POLICIES = ("round_robin", "least_loaded", "prefix_aware")
DEFAULT_POLICY = "prefix_aware"  # the one default: `tandem serve router`, the deploy config and the router
DECODE_ROLES = ("monolithic", "decode")


class WorkerView(Protocol):
    """What placement reads of a worker."""

    address: str
    healthy: bool

    @property
    def role(self) -> str: ...

    @property
    def score(self) -> int:
        """Its load: requests this router has running there."""
        ...

    def match(self, keys: Sequence[BlockKey]) -> int:
        """Leading blocks of `keys` its prefix cache holds."""
        ...


@dataclass
class Route:
    policy: str
    decode: WorkerView
    prefill: WorkerView | None = None
    cached_tokens: int = 0  # prompt tokens the route expects to find cached

    def header(self) -> str:
        prefill = self.prefill.address if self.prefill else ""
        return (
            f"policy={self.policy};prefill={prefill};decode={self.decode.address};"
            f"cached_tokens={self.cached_tokens}"
        )


class Placement:
    def __init__(self, policy: str = DEFAULT_POLICY, disagg_threshold: int = 256, balance_threshold: int = 4):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got '{policy}'")
        if disagg_threshold < 0 or balance_threshold < 0:
            raise ValueError("disagg_threshold and balance_threshold must not be negative")
        self.policy = policy
        self.disagg_threshold = disagg_threshold
        self.balance_threshold = balance_threshold
        self._turns: dict[str, itertools.count] = collections.defaultdict(itertools.count)  # per pick kind

    def pick(self, candidates: Sequence[WorkerView], keys: Sequence[BlockKey] = (), kind: str = "decode"):
        """One of `candidates` by the policy (None when there is none)."""
        if not candidates:
            return None
        if self.policy == "round_robin":  # decode and prefill picks take turns apart (a shared turn
            # would send every request to the same decode worker when both roles have two)
            return candidates[next(self._turns[kind]) % len(candidates)]
        least = min(candidates, key=lambda w: (w.score, -w.match(keys)))
        if self.policy == "least_loaded" or not keys:
            return least
        best = max(candidates, key=lambda w: (w.match(keys), -w.score))
        if best.match(keys) == 0 or best.score - least.score > self.balance_threshold:
            return least
        return best

    async def place(
        self,
        workers: Sequence[WorkerView],
        keys: Sequence[BlockKey],
        prompt_len: int,
        block_size: int,
        exclude: set[str] = frozenset(),
        in_store: Callable[[], Awaitable[int]] | None = None,
    ) -> Route | None:
        """The route of a prompt of `prompt_len` tokens whose full blocks are `keys`, over the healthy
        `workers` not in `exclude`. `in_store()`: how many leading blocks the KV store holds (asked
        only when a remote prefill is possible)."""

        def candidates(roles: tuple[str, ...]) -> list[WorkerView]:
            return [w for w in workers if w.healthy and w.role in roles and w.address not in exclude]

        prefillers = candidates(("prefill",))
        decode = self.pick(candidates(DECODE_ROLES) or prefillers, keys)
        if decode is None:
            return None
        local = decode.match(keys)
        route = Route(self.policy, decode, cached_tokens=min(local * block_size, prompt_len))
        if not prefillers or decode.role == "prefill":
            return route
        stored = await in_store() if in_store is not None and keys else 0
        if prompt_len - max(local, stored) * block_size > self.disagg_threshold:
            route.prefill = self.pick(prefillers, keys, kind="prefill")
            route.cached_tokens = min(max(route.prefill.match(keys), stored) * block_size, prompt_len)
        return route
