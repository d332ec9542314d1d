"""The router's placement over fake workers: policies, the balance between prefix affinity and load,
and when a prompt is prefilled on a prefill worker."""

import asyncio
from dataclasses import dataclass, field

import pytest

from services.router.placement import Placement

BLOCK = 16


@dataclass
class Fake:
    address: str
    role: str = "monolithic"
    healthy: bool = True
    cached: set = field(default_factory=set)
    running: int = 0

    @property
    def score(self) -> int:
        return self.running

    def match(self, keys) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.cached:
            n += 1
        return n


def place(placement, workers, keys, prompt_len, exclude=frozenset(), stored=0):
    async def in_store():
        return stored

    return asyncio.run(placement.place(workers, keys, prompt_len, BLOCK, set(exclude), in_store))


def test_prefix_aware_balances_affinity_and_load():
    p = Placement("prefix_aware", balance_threshold=2)
    a, b = Fake("a", cached={b"k0", b"k1"}), Fake("b", cached={b"k0"})
    keys = [b"k0", b"k1", b"k2"]
    assert p.pick([a, b], keys) is a
    a.running = 2  # within the threshold: affinity wins
    assert p.pick([a, b], keys) is a
    a.running = 3  # beyond it: the least loaded
    assert p.pick([a, b], keys) is b
    a.running = 0
    assert p.pick([a, b], [b"other"]) is a  # no match anywhere: least loaded (ties: the first)
    a.running = 1
    assert p.pick([a, b], [b"other"]) is b


def test_least_loaded_and_round_robin():
    a, b = Fake("a", running=3, cached={b"k"}), Fake("b", running=1)
    assert Placement("least_loaded").pick([a, b], [b"k"]) is b
    rr = Placement("round_robin")
    # decode and prefill picks take separate turns
    decodes = [rr.pick([a, b], kind="decode").address for _ in range(4)]
    prefills = [rr.pick([a, b], kind="prefill").address for _ in range(2)]
    assert decodes == ["a", "b", "a", "b"] and prefills == ["a", "b"]


def test_unhealthy_and_excluded_workers_are_skipped():
    p = Placement("least_loaded")
    a, b = Fake("a", healthy=False), Fake("b", running=9)
    assert place(p, [a, b], [], 10).decode is b
    assert place(p, [a, b], [], 10, exclude={"b"}) is None


def test_remote_prefill_only_beyond_the_threshold_of_uncached_tokens():
    p = Placement("prefix_aware", disagg_threshold=64)
    decode, prefill = Fake("d", role="decode"), Fake("p", role="prefill")
    keys = [bytes([i]) for i in range(10)]  # a 160-token prompt
    route = place(p, [decode, prefill], keys, 160)
    assert route.decode is decode and route.prefill is prefill and route.cached_tokens == 0
    route = place(p, [decode, prefill], keys, 160, stored=7)  # the store holds 112 tokens: 48 to go
    assert route.prefill is None
    decode.cached = set(keys[:6])  # the decode worker itself holds 96: 64 to go, not beyond
    route = place(p, [decode, prefill], keys, 160)
    assert route.prefill is None and route.cached_tokens == 96
    decode.cached = set()
    prefill.cached = set(keys[:4])
    route = place(p, [decode, prefill], keys, 160, stored=2)
    assert route.prefill is prefill and route.cached_tokens == 64  # what the prefill worker holds
    assert "prefill=p;decode=d" in route.header()


def test_prefill_workers_decode_when_no_other_is_up():
    p = Placement("prefix_aware", disagg_threshold=0)
    prefill = Fake("p", role="prefill")
    route = place(p, [Fake("d", role="decode", healthy=False), prefill], [b"x"], 100)
    assert route.decode is prefill and route.prefill is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        Placement("random")
    with pytest.raises(ValueError, match="must not be negative"):
        Placement(disagg_threshold=-1)
