"""Expert parallelism: the experts of every MoE layer split across the shards of a process group.

    group = dist.new_group(...) or None (the default group)
    shard_experts(model, group)          # in place: each SparseMoE becomes an ExpertParallelMoE

The model code knows nothing of this: sharding replaces modules from here. Each shard keeps the
experts its placement gives it (contiguous by default: shard r of P owns experts [r·E/P, (r+1)·E/P))
and runs attention, the router and the shared experts for its own tokens (data-parallel attention:
every shard serves different requests, so nothing but the routed hidden states crosses shards).

Per MoE layer (`ExpertParallelMoE.forward`), for the shard's T tokens routed to k experts each:
  1. route locally; each (token, expert) pair goes to the expert's owner — a token travels only to
     the shards that own its experts;
  2. all_to_all of the per-shard pair counts, then of the hidden rows and of (expert id, weight);
  3. run the local experts on what arrived (the same ExpertBank code as unsharded);
  4. all_to_all the weighted results back, and sum them per token.
Every shard takes part in every collective, also with no tokens (it sends and receives nothing but
the counts), so the shards must run the same number of MoE layers in the same order: one scheduler
drives the group and the shards step in lock-step.

Works over gloo (CPU) and NCCL (GPU): tensors stay on the hidden states' device, split sizes are
exchanged first so every all_to_all knows its shapes. Per-expert routed-token counts accumulate in
`expert_tokens` (this shard's tokens, all experts) for load-balance monitoring; `imbalance()` is
max / mean over experts.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from shared.models.moe import ExpertBank, SparseMoE, add_shared_experts


def contiguous_placement(num_experts: int, world: int) -> list[int]:
    """owner[e] for E experts over `world` shards, in contiguous runs."""
    if num_experts < world:
        raise ValueError(f"{num_experts} experts cannot be split over {world} shards")
    return [e * world // num_experts for e in range(num_experts)]


class ExpertParallelMoE(nn.Module):
    def __init__(self, moe: SparseMoE, owner: list[int], rank: int, world: int, group=None):
        super().__init__()
        self.moe_config = moe.moe
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        self.shared_expert_gate = moe.shared_expert_gate
        self.group, self.rank, self.world = group, rank, world
        local = [e for e, r in enumerate(owner) if r == rank]
        if not local:
            raise ValueError(f"shard {rank} owns no experts")
        bank = moe.experts
        self.experts = ExpertBank(bank.gate_proj.shape[2], moe.moe, num_experts=len(local))
        idx = torch.tensor(local, device=bank.gate_proj.device)
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self.experts, name).data = getattr(bank, name).data.index_select(0, idx).clone()
        device = bank.gate_proj.device
        self.register_buffer("owner", torch.tensor(owner, dtype=torch.long, device=device), persistent=False)
        to_local = torch.full((len(owner),), -1, dtype=torch.long, device=device)
        to_local[idx] = torch.arange(len(local), device=device)
        self.register_buffer("to_local", to_local, persistent=False)
        self.register_buffer(
            "expert_tokens", torch.zeros(len(owner), dtype=torch.long, device=device), persistent=False
        )
        self.last_expert_counts: torch.Tensor | None = None
        self.comm_seconds = 0.0  # time in this layer's collectives (all calls), for benchmarks
        self.comm_bytes = 0  # hidden-state bytes this shard sent
        self.calls = 0

    def imbalance(self) -> float:
        counts = self.expert_tokens.float()
        return float(counts.max() / counts.mean()) if counts.sum() > 0 else 1.0

    def _all_to_all(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        t0 = time.perf_counter()
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=self.group)
        self.comm_seconds += time.perf_counter() - t0
        self.comm_bytes += rows.numel() * rows.element_size()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        k = self.moe_config.top_k
        _, weights, experts = self.gate(x)  # [T, k]
        flat = experts.reshape(-1)
        self.last_expert_counts = torch.bincount(flat, minlength=self.owner.shape[0])
        self.expert_tokens += self.last_expert_counts
        dest = self.owner[flat]  # [T*k] shard of each (token, expert) pair
        order = dest.argsort(stable=True)
        send_counts = torch.bincount(dest, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        t0 = time.perf_counter()
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        self.comm_seconds += time.perf_counter() - t0
        self.calls += 1
        send, recv = send_counts.tolist(), recv_counts.tolist()
        token_of = order // k
        # expert ids ride with the weights as float32 (exact below 2**24)
        meta = torch.stack((flat[order].float(), weights.reshape(-1)[order].float()), dim=1)  # [T*k, 2]
        got_x = self._all_to_all(x[token_of], send, recv)
        got_meta = self._all_to_all(meta, send, recv)
        local = self.to_local[got_meta[:, 0].long()]
        y = self.experts(got_x, got_meta[:, 1:2], local[:, None])  # weighted expert outputs
        back = self._all_to_all(y, recv, send)  # [T*k, D], in `order`
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, back)
        return add_shared_experts(out, x, self.shared_experts, self.shared_expert_gate)


def shard_experts(model: nn.Module, group=None, placement: list[int] | None = None) -> nn.Module:
    """Replace every SparseMoE in `model` by this shard's ExpertParallelMoE (in place)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SparseMoE):
                owner = placement or contiguous_placement(child.moe.num_experts, world)
                setattr(parent, name, ExpertParallelMoE(child, owner, rank, world, group))
    return model


def moe_layers(model: nn.Module) -> list[ExpertParallelMoE]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
