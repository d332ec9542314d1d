"""Sampler: next tokens for a batch of requests, each with its own SamplingParams.

Order of operations on a row of logits (float32):
  1. logprobs, if asked, come from the raw model distribution (log_softmax of the logits);
  2. logit_bias; min_tokens masks EOS and stop_token_ids; repetition (HF rule: divide positive,
     multiply negative logits of seen tokens), frequency and presence penalties (OpenAI rule);
  3. structured output: tokens the request's grammar does not allow next get -inf (structured.py);
  4. temperature 0 -> argmax; otherwise divide by temperature, keep top_k, then the top_p nucleus,
     then tokens with p >= min_p * p_max, and sample.
Sampling is an exponential race, argmax(p / E) with E ~ Exp(1) drawn from the request's own
generator: the same seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from shared.core.logprobs import TokenLogprob
from shared.engine.request import Request
from shared.engine.structured import apply_masks


class Sampler:
    def __init__(self, kernels=None):
        self.kernels = kernels  # torch.ops.tandem (shared/kernels) for argmax on CPU, or None

    def __call__(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> list[tuple[int, TokenLogprob | None]]:
        raw_logprobs = (
            logits.log_softmax(-1) if any(r.params.logprobs is not None for r in requests) else None
        )
        logits = self.adjusted(logits, requests)
        tokens = self._argmax(logits)
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            tokens[rows] = self._sample(logits[rows], [requests[i] for i in sampled_rows])
        out = []
        for i, (request, token) in enumerate(zip(requests, tokens.tolist(), strict=True)):
            lp = None
            if raw_logprobs is not None and request.params.logprobs is not None:
                lp = logprob(raw_logprobs[i], token, request.params.logprobs)
            out.append((token, lp))
        return out

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
            return self.kernels.argmax_rows(logits)  # reads the LM head's transposed layout directly
        return logits.argmax(-1)

    def _process(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        for i, r in enumerate(requests):
            p = r.params
            if p.logit_bias:
                toks = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
                logits[i, toks] += torch.tensor([b for _, b in p.logit_bias], device=logits.device)
            if len(r.output_token_ids) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                if banned:
                    logits[i, torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.all_token_ids)), device=logits.device, dtype=torch.long)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            if (p.frequency_penalty or p.presence_penalty) and r.output_token_ids:
                out_ids = torch.tensor(r.output_token_ids, device=logits.device)
                counts = torch.bincount(out_ids, minlength=logits.shape[1]).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        apply_masks(logits, [(i, r.matcher) for i, r in enumerate(requests) if r.matcher is not None])
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        return race(distribution(logits, requests), [r.generator for r in requests])

    def adjusted(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Steps 2-3 (biases, penalties, the grammar's mask) on a copy, where any apply."""
        if any(_adjusts_logits(r) for r in requests):
            return self._process(logits.contiguous().clone(), requests)
        return logits


def distribution(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Step 4's distribution of each row [B, V]: temperature, then top_k, top_p and min_p."""
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in requests], device=dev)
    logits = logits / temps[:, None]
    top_k = torch.tensor(
        [r.params.top_k if r.params.top_k > 0 else logits.shape[1] for r in requests], device=dev
    )
    top_p = torch.tensor([r.params.top_p for r in requests], device=dev)
    min_p = torch.tensor([r.params.min_p for r in requests], device=dev)
    if (top_k < logits.shape[1]).any() or (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(logits.shape[1], device=dev)[None, :]
        drop = rank >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop = before >= top_p[:, None]  # the token that crosses top_p is kept
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
    return probs


def race(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row drawn from `probs` (unnormalized is fine): argmax(p / E), E ~ Exp(1) from each
    row's own generator."""
    noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=g) for g in generators])
    return (probs / noise.to(probs.device)).argmax(-1)


def _adjusts_logits(r: Request) -> bool:
    p = r.params
    return bool(
        r.matcher is not None
        or p.logit_bias
        or len(r.output_token_ids) < p.min_tokens
        or p.repetition_penalty != 1.0
        or ((p.frequency_penalty or p.presence_penalty) and r.output_token_ids)
    )


def logprob(row: torch.Tensor, token: int, n: int) -> TokenLogprob:
    top = ()
    if n > 0:
        vals, idx = row.topk(n)
        top = tuple(zip(idx.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token, float(row[token]), top)
