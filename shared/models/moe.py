"""Sparse mixture-of-experts FFN: a router, a bank of SwiGLU experts, optional shared experts.

Legend: T tokens, D hidden, E experts, I expert intermediate size, k experts per token.

The expert bank stores its weights stacked ([E, I, D] / [E, D, I]) rather than as E modules: one
tensor per projection is what expert-parallel sharding slices (a shard keeps rows [e0, e1) of each),
and what a grouped GEMM kernel wants on a GPU. Checkpoints with one tensor per expert are stacked by
the loader.

Routing rules (MoEConfig.scoring):
  softmax  p = softmax(logits); top-k of p; renormalise over the k if norm_topk_prob (Mixtral always)
  sigmoid  s = sigmoid(logits); experts chosen on s + correction bias, restricted to the best
           topk_group of n_group groups (a group scores by the sum of its two best); weights are s
           of the chosen, optionally renormalised, times routed_scaling_factor (DeepSeek-V3, dots1)

`SparseMoE.forward` also records how many tokens each expert received (`last_expert_counts`), which
the engine exports for load-balance monitoring and the trainer uses for bias balancing; in training
mode it keeps the router logits of the call too (`last_router_logits`, for the balancing loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.config import MoEConfig
from shared.models.layers import GatedMLP


class TopKRouter(nn.Module):
    def __init__(self, hidden: int, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden))
        if moe.scoring == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> (logits [T, E] float32, weights [T, k] float32, experts [T, k] int64)."""
        logits = F.linear(x.float(), self.weight.float())
        if self.moe.scoring == "sigmoid":
            weights, experts = self._sigmoid_topk(logits)
        else:
            probs = logits.softmax(dim=-1)
            weights, experts = probs.topk(self.moe.top_k, dim=-1)
            if self.moe.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    def _sigmoid_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.moe
        scores = logits.sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if moe.n_group > 1:
            grouped = choice.view(-1, moe.n_group, moe.num_experts // moe.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(moe.topk_group, dim=-1).indices, True)
            keep = keep[:, :, None].expand_as(grouped).reshape(choice.shape)
            choice = choice.masked_fill(~keep, float("-inf"))
        experts = choice.topk(moe.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, experts)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * moe.routed_scaling_factor, experts


class ExpertBank(nn.Module):
    """E SwiGLU experts with stacked weights; computes only the experts that received tokens."""

    def __init__(self, hidden: int, moe: MoEConfig, num_experts: int | None = None):
        super().__init__()
        e = num_experts if num_experts is not None else moe.num_experts
        self.gate_proj = nn.Parameter(torch.empty(e, moe.intermediate_size, hidden))  # [E, I, D]
        self.up_proj = nn.Parameter(torch.empty(e, moe.intermediate_size, hidden))  # [E, I, D]
        self.down_proj = nn.Parameter(torch.empty(e, hidden, moe.intermediate_size))  # [E, D, I]

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        weights: torch.Tensor,  # [T, k]
        experts: torch.Tensor,  # [T, k], indices into this bank
    ) -> torch.Tensor:  # [T, D]
        out = torch.zeros_like(x)
        flat = experts.reshape(-1)  # [T*k]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        token_of = order // experts.shape[1]  # [T*k] token index of each sorted slot
        w_sorted = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token_of[start : start + n]
            h = x[idx]  # [n, D]
            h = F.silu(h @ self.gate_proj[e].t()) * (h @ self.up_proj[e].t())  # [n, I]
            h = (h @ self.down_proj[e].t()) * w_sorted[start : start + n, None].to(x.dtype)
            out.index_add_(0, idx, h)
            start += n
        return out


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.gate = TopKRouter(hidden, moe)
        self.experts = ExpertBank(hidden, moe)
        self.shared_experts = (
            GatedMLP(hidden, moe.shared_intermediate_size) if moe.shared_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if moe.shared_expert_gate else None
        self.last_expert_counts: torch.Tensor | None = None  # [E] tokens routed per expert, last call
        self.last_router_logits: torch.Tensor | None = None  # [T, E] last call's, in training mode only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, weights, experts = self.gate(x)
        self.last_expert_counts = torch.bincount(experts.reshape(-1), minlength=self.moe.num_experts)
        self.last_router_logits = logits if self.training else None
        return add_shared_experts(
            self.experts(x, weights, experts), x, self.shared_experts, self.shared_expert_gate
        )


def add_shared_experts(routed: torch.Tensor, x: torch.Tensor, shared_experts, gate) -> torch.Tensor:
    """The routed experts' output plus the shared experts' (behind a sigmoid gate, for Qwen2-MoE)."""
    if shared_experts is None:
        return routed
    shared = shared_experts(x)
    if gate is not None:
        shared = torch.sigmoid(gate(x)) * shared
    return routed + shared
