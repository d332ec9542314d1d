"""One scheduler driving an expert-parallel group: the leader's engine plans every step, each shard
runs its part of it, all shards step in lock-step.

    # rank 0 (the leader): an ordinary LLMEngine whose runner is wrapped
    engine = LLMEngine.from_store(path, EngineConfig())
    shard_experts(engine.model, group)
    lead(engine, group)
    ... engine.step() / generate() as usual ...; engine.runner.close()
    # ranks 1..P-1 (followers)
    shard_experts(engine.model, group); follow(engine.runner, group)

Each request lives on one shard for its whole life (assigned at its first step to the shard with the
fewest requests): its KV stays in that shard's cache (data-parallel attention). Per step the leader
broadcasts, for every shard, the scheduled requests' token ids, positions and block tables (as
`StepRequest`s), every shard runs its part — an idle shard runs an empty forward, so it still joins
every MoE layer's all-to-all — and the logits of the requests that sample come back to the leader,
which samples and post-processes as usual. Block ids come from the leader's one pool, so every shard
sizes its cache for the whole pool and touches only its requests' blocks.

Imported KV (a disaggregated decode, or a prefix from the KV store) is written on the shard that
will own the request: `write_blocks` places the request then, and the payload travels with the next
step's plan.

Prefix caching: a cached block's KV exists only in the cache of the shard that wrote it, so the
runner remembers each block's owner (updated whenever a step or an import writes the block) and
filters the engine's prefix hits (`usable_prefix`): a new request goes to the shard holding the
start of its cached prefix, unless that shard already runs AFFINITY_SLACK more requests than the
least busy one (then it recomputes, for balance), and uses only the leading blocks held there.
Exporting KV from a group (prefill-only) is not supported (raised as an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shared.engine.model_runner import ModelRunner


@dataclass
class StepRequest:
    """What ModelRunner.execute reads of a request, without the rest of it."""

    request_id: str
    all_token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[int] = field(default_factory=list)
    spec_token_ids: tuple[int, ...] = ()  # a group's engine does not speculate

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]


#: a prefix hit moves a request to the owning shard unless that shard runs this many more requests
#: than the least busy one
AFFINITY_SLACK = 4


class GroupRunner:
    def __init__(self, runner: ModelRunner, group=None, live: dict | None = None, block_size: int = 16):
        """`live`: the leader engine's requests by id (shard assignments of requests no longer in it
        are dropped)."""
        self.runner = runner
        self.block_size = block_size
        self.owner: dict[int, int] = {}  # block id -> the shard whose cache holds its current KV
        self.group = group
        self.world = dist.get_world_size(group)
        self.src = _leader(group)
        self.live = live if live is not None else {}
        self.shard_of: dict[str, int] = {}
        self.block_shape = runner.block_shape
        self.steps = 0
        self.writes: list[list[tuple[list[int], torch.Tensor]]] = [[] for _ in range(self.world)]

    def prune(self) -> None:
        """Forget the shards of requests the engine no longer has."""
        for rid in [rid for rid in self.shard_of if rid not in self.live]:
            del self.shard_of[rid]

    def _loads(self) -> list[int]:
        load = [0] * self.world
        for s in self.shard_of.values():
            load[s] += 1
        return load

    def _place(self, request_id: str) -> int:
        shard = self.shard_of.get(request_id)
        if shard is None:
            load = self._loads()
            shard = self.shard_of[request_id] = load.index(min(load))
        return shard

    def usable_prefix(self, request, blocks: list[int]) -> list[int]:
        """The engine's prefix filter: the leading cached blocks held by the request's shard (placing
        a new request on the shard that holds its prefix, if that keeps the load balanced)."""
        self.prune()
        shard = self.shard_of.get(request.request_id)
        if shard is None:
            shard = self.owner.get(blocks[0])
            load = self._loads()
            if shard is None or load[shard] > min(load) + AFFINITY_SLACK:
                return []
        n = 0
        while n < len(blocks) and self.owner.get(blocks[n]) == shard:
            n += 1
        if n:
            self.shard_of[request.request_id] = shard
        return blocks[:n]

    def _written(self, request, n: int, shard: int) -> None:
        """Record the blocks this step writes for `request` (positions num_computed .. +n) on `shard`."""
        first = request.num_computed_tokens // self.block_size
        last = (request.num_computed_tokens + n - 1) // self.block_size
        for block in request.block_ids[first : last + 1]:
            self.owner[block] = shard

    def execute(self, scheduled):
        self.prune()
        plan: list[list[tuple[StepRequest, int]]] = [[] for _ in range(self.world)]
        for request, n in scheduled:
            shard = self._place(request.request_id)
            self._written(request, n, shard)
            step = StepRequest(request.request_id, list(request.all_token_ids), request.num_prompt_tokens,
                               request.num_computed_tokens, list(request.block_ids))  # fmt: skip
            plan[shard].append((step, n))
        writes, self.writes = self.writes, [[] for _ in range(self.world)]
        dist.broadcast_object_list([(plan, writes)], src=self.src, group=self.group)
        for blocks, payload in writes[0]:
            self.runner.write_blocks(blocks, payload)
        samplers, logits = self.runner.execute(plan[0])
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, ([s.request_id for s in samplers], logits), group=self.group)
        self.steps += 1
        by_id = {rid: part[i] for ids, part in gathered for i, rid in enumerate(ids)}
        requests = [r for r, n in scheduled if r.num_computed_tokens + n == r.num_tokens]
        rows = [by_id[r.request_id] for r in requests]
        return requests, (torch.stack(rows) if rows else logits[:0])

    def write_blocks(
        self, block_ids: list[int], payload: torch.Tensor, request_id: str | None = None
    ) -> None:
        """Queue imported KV for the shard that will own `request_id` (sent with the next step)."""
        if request_id is None:
            raise ValueError("a group needs to know which request imported KV belongs to")
        expected = (len(block_ids), *self.block_shape)
        if tuple(payload.shape) != expected:
            raise ValueError(f"KV payload has shape {tuple(payload.shape)}, this cache expects {expected}")
        shard = self._place(request_id)
        self.owner.update(dict.fromkeys(block_ids, shard))
        self.writes[shard].append((list(block_ids), payload.cpu()))

    exports_kv = False  # a request's blocks live on the shard that ran it; the engine reads none back

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        if block_ids:
            raise NotImplementedError("KV export from an expert-parallel group is not supported yet")
        return self.runner.read_blocks([])

    def close(self) -> None:
        """Tell the followers to stop."""
        self.prune()
        dist.broadcast_object_list([None], src=self.src, group=self.group)


def _leader(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def follow(runner: ModelRunner, group=None) -> int:
    """A follower's loop: run its part of every step the leader broadcasts, until close(). Returns the
    number of steps taken."""
    rank, world, src = dist.get_rank(group), dist.get_world_size(group), _leader(group)
    steps = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=src, group=group)
        if box[0] is None:
            return steps
        plan, writes = box[0]
        for blocks, payload in writes[rank]:
            runner.write_blocks(blocks, payload)
        samplers, logits = runner.execute(plan[rank])
        dist.all_gather_object([None] * world, ([s.request_id for s in samplers], logits), group=group)
        steps += 1


def lead(engine, group=None) -> GroupRunner:
    """Make `engine` (rank 0's, its model already sharded) drive the group; returns its runner."""
    engine.runner = GroupRunner(
        engine.runner, group, live=engine.requests, block_size=engine.config.block_size
    )
    engine.kv.prefix_filter = engine.runner.usable_prefix
    return engine.runner
