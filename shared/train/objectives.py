"""Losses: next-token log-likelihood of the targets, DPO over preference pairs, MoE load balancing.

Legend: T tokens in the flat batch, N target tokens, S sequences, P preference pairs, E experts.

Every loss here is a *sum* over the batch's targets (or pairs); the trainer divides by the count over
the whole global batch (all micro-batches on all workers), so the gradient is that of the global
token-mean loss however the batch is split: 1 worker × 4 micro-batches and 2 workers × 2 give the same
step up to float summation order.

DPO (Rafailov et al., 2023), for a pair with chosen c and rejected r under policy π and frozen
reference π_ref:   loss = -log σ(β · ((log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))))
where log π(y) sums the log-probabilities of the response's target tokens.

Load balancing (Switch Transformer / Mixtral, as transformers computes it): per MoE layer,
E · Σ_e f_e · P_e with f_e the fraction of tokens routed to expert e (top-k counts / T) and P_e the
mean router probability of e; averaged over layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.models.attention import VarlenAttention
from shared.models.moe import SparseMoE
from shared.models.transformer import CausalLM
from shared.train.data import Batch

#: target rows per logits chunk: bounds the [rows, vocab] float32 logits kept for backward
LOGITS_CHUNK = 1024


def target_logprobs(model: CausalLM, batch: Batch) -> torch.Tensor:
    """log p(target) for each of the batch's N targets, [N] float32."""
    hidden = model(batch.input_ids, batch.positions, VarlenAttention(batch.seq_lens))  # [T, D]
    rows = hidden[batch.pred_rows]  # [N, D]
    out = []
    for start in range(0, rows.shape[0], LOGITS_CHUNK):
        logits = model.compute_logits(rows[start : start + LOGITS_CHUNK]).float()  # [n, V]
        labels = batch.labels[start : start + LOGITS_CHUNK]
        out.append(-F.cross_entropy(logits, labels, reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(token_logprobs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum of target log-probs per sequence, [S]."""
    out = token_logprobs.new_zeros(len(batch.seq_lens))
    return out.index_add(0, batch.label_seq, token_logprobs)


def dpo_loss(
    policy: torch.Tensor,  # [S] sequence log-probs, pairs interleaved (chosen, rejected, ...)
    reference: torch.Tensor,  # [S]
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(sum of the pairs' losses, stats: pairs, reward accuracy and margin sums)."""
    ratio = policy - reference  # [S]
    chosen, rejected = ratio[0::2], ratio[1::2]  # [P]
    logits = beta * (chosen - rejected)
    losses = -F.logsigmoid(logits)
    stats = {
        "pairs": float(chosen.shape[0]),
        "reward_accuracy_sum": float((logits > 0).sum()),
        "reward_margin_sum": float(logits.detach().sum()),
    }
    return losses.sum(), stats


def moe_balance_loss(model: CausalLM) -> torch.Tensor | None:
    """The Switch/Mixtral balancing loss of the last forward, averaged over MoE layers (None: dense)."""
    terms = []
    for module in model.modules():
        if not isinstance(module, SparseMoE) or module.last_router_logits is None:
            continue
        logits = module.last_router_logits  # [T, E]
        if logits.shape[0] == 0:
            continue
        if module.moe.scoring == "sigmoid":
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            probs = logits.softmax(dim=-1)
        fraction = module.last_expert_counts.to(probs.dtype) / logits.shape[0]  # [E]
        terms.append(module.moe.num_experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(terms).mean() if terms else None
