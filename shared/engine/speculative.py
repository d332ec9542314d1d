"""Speculative decoding: guess a few tokens cheaply, check them all in one forward of the model.

Each step, a decoding request that asks for it (`SamplingParams.speculative`, else the engine's
default) gets up to k draft tokens in `request.spec_token_ids`. The scheduler runs its last token and
the drafts as one chunk of k+1 rows, so the model's logits at every row are the target distribution
after each prefix of the drafts; `verify` keeps the longest prefix of drafts the rejection rule accepts
and adds one token of the model's own — between 1 and k+1 tokens for the price of one step over the
weights (a CPU decode step is bound by reading them). The drafts' KV is written into the request's own
blocks; only the accepted part counts as computed, so a rejected draft's slots are simply overwritten
later and never reach the prefix cache.

Proposers:
  ngram   prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
          n tokens (n from prompt_lookup_max down to prompt_lookup_min). Free; good when the output
          quotes its input (summaries, code edits, extraction).
  draft   a smaller model with the same vocabulary (a store model), run k steps on its own paged KV
          cache: greedily for greedy requests, else sampled at the request's settings, recording the
          draft distribution q the rule needs.

The rule (Leviathan et al. 2023, Chen et al. 2023) keeps the output distributed exactly as without
speculation: draft d (drawn from q) is accepted with probability min(1, p(d) / q(d)), where p is the
request's final sampling distribution at that row (penalties, grammar-free, temperature, top-k/p,
min-p, seen through the tokens accepted before it); on rejection the token is drawn from
normalize(max(0, p - q)), and when every draft is accepted one more is drawn from the last row's p.
A deterministic proposal (n-gram, or a greedy draft) is the case q = one-hot(d). Greedy requests
accept a draft iff it is the argmax, so their tokens are identical to decoding without speculation.
Sampled outputs keep their distribution but not their exact tokens for a given seed (the draws differ).

Not speculated: requests with a grammar (structured output), prefill-only requests, and engines whose
runner cannot return several rows per request (an expert-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.core.logprobs import TokenLogprob
from shared.core.sampling_params import SamplingParams
from shared.engine.block_pool import BlockPool
from shared.engine.kv_cache_manager import KVCacheManager
from shared.engine.model_runner import ModelRunner
from shared.engine.request import Request
from shared.engine.sampler import Sampler, distribution, logprob, race
from shared.models.transformer import CausalLM

METHODS = ("off", "ngram", "draft")


@dataclass(frozen=True)
class SpecConfig:
    method: str = "off"  # the default of requests that do not choose: off | ngram | draft
    num_tokens: int = 4  # drafts per step (a request may ask for another number)
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 3
    # a step's decode rows plus drafts stay within this: verifying costs compute, and once a batch has
    # this many rows a CPU step is no longer bound by reading the weights, so drafts stop paying
    max_rows: int = 8

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_tokens}")
        if self.max_rows < 2:
            raise ValueError(f"speculative_max_rows must be at least 2, got {self.max_rows}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"prompt lookup needs 1 <= min <= max, got min {self.prompt_lookup_min}, "
                f"max {self.prompt_lookup_max}"
            )


@dataclass
class SpecStats:
    drafts: int = 0  # verification steps that carried drafts
    draft_tokens: int = 0
    accepted_tokens: int = 0


def ngram_lookup(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    if len(tokens) < n_min + 1:
        return []
    t = torch.tensor(tokens, dtype=torch.long)
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        windows = t[:-1].unfold(0, n, 1)  # every n-gram that has a token after it
        hits = (windows == t[-n:]).all(1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return []


class DraftProposer:
    """A draft model on its own paged KV cache, one shadow request per target request."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype, cpu_kernels: bool,
                 int8_activations: bool = False):  # fmt: skip
        self.model = model.eval().fuse_for_inference()
        self.runner = ModelRunner(self.model, num_blocks, block_size, dtype, cpu_kernels, int8_activations)
        self.kv = KVCacheManager(BlockPool(num_blocks, block_size), ("draft", "draft"), False)
        self.max_len = model.config.max_position_embeddings
        self.shadows: dict[str, Request] = {}

    def release(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.kv.free(shadow)

    def _sync(self, request: Request) -> Request:
        """The request's shadow, its tokens set to the request's, its KV kept up to where they agree."""
        context = request.all_token_ids
        shadow = self.shadows.get(request.request_id)
        if shadow is None:
            shadow = Request(request.request_id, list(context), SamplingParams(max_tokens=1, seed=0))
            self.shadows[request.request_id] = shadow
            return shadow
        old, agree = shadow.all_token_ids, shadow.num_prompt_tokens  # a context only grows
        while agree < min(len(old), len(context)) and old[agree] == context[agree]:
            agree += 1
        shadow.prompt_token_ids, shadow.output_token_ids = list(context), []
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, agree, len(context) - 1)
        return shadow

    @torch.inference_mode()
    def propose(self, wanted: list[tuple[Request, int]]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """Up to k drafts for each (request, k), with their distributions q [k, V] for sampled requests."""
        live = {r.request_id for r, _ in wanted}
        for rid in [rid for rid in self.shadows if rid not in live]:
            self.release(rid)
        batch: list[tuple[Request, int]] = []
        owners: dict[str, tuple[Request, int]] = {}
        for request, k in wanted:
            shadow = self._sync(request)
            n = shadow.num_tokens - shadow.num_computed_tokens
            if shadow.num_tokens + k > self.max_len or not self.kv.allocate_slots(shadow, n + k - 1):
                self.release(request.request_id)  # no room: this request goes without drafts this step
                continue
            batch.append((shadow, n))
            owners[request.request_id] = (request, k)
        drafts: dict[str, list[int]] = {rid: [] for rid in owners}
        probs: dict[str, list[torch.Tensor]] = {rid: [] for rid in owners}
        while batch:
            shadows, logits = self.runner.execute(batch)
            for i, shadow in enumerate(shadows):
                request, _ = owners[shadow.request_id]
                if request.params.greedy:
                    token = int(logits[i].argmax())
                else:
                    q = distribution(logits[i : i + 1], [request])
                    token = int(race(q, [request.generator])[0])
                    probs[shadow.request_id].append(q[0])
                drafts[shadow.request_id].append(token)
            for shadow, n in batch:
                shadow.num_computed_tokens += n
                shadow.output_token_ids.append(drafts[shadow.request_id][-1])
            batch = [(s, 1) for s, _ in batch if len(drafts[s.request_id]) < owners[s.request_id][1]]
        return {rid: (drafts[rid], torch.stack(probs[rid]) if probs[rid] else None) for rid in owners}


class Speculator:
    """Plans drafts for an engine's decoding requests and verifies them (see the module docstring)."""

    def __init__(self, config: SpecConfig, sampler: Sampler, draft: DraftProposer | None = None):
        config.check()
        if config.method == "draft" and draft is None:
            raise ValueError("speculative method 'draft' needs a draft model")
        self.config, self.sampler, self.draft = config, sampler, draft
        self.stats = {m: SpecStats() for m in METHODS[1:]}
        # per request: a moving average of the drafts accepted per step, which sets its next k (a
        # request whose drafts keep failing drafts fewer; k never depends on the step's own draws)
        self.accepted: dict[str, float] = {}

    @classmethod
    def build(cls, config: SpecConfig, sampler: Sampler, vocab_size: int, draft: CausalLM | None, **runner):
        """The engine's speculator; `runner`: the draft's DraftProposer arguments (its cache is sized like
        the engine's: num_blocks, block_size, dtype, cpu_kernels, int8_activations)."""
        if draft is not None:
            if draft.config.vocab_size != vocab_size:
                raise ValueError(
                    f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the model's "
                    f"({vocab_size})"
                )
            draft = DraftProposer(draft, **runner)
        return cls(config, sampler, draft)

    def method(self, params: SamplingParams) -> str:
        return params.speculative or self.config.method

    def check(self, params: SamplingParams) -> None:
        """A request's speculative choice, refused (ValueError) where this engine cannot honour it."""
        if params.speculative == "draft" and self.draft is None:
            raise ValueError("speculative 'draft' needs a draft model, and this engine has none")

    def plan(self, running: list[Request], max_model_len: int) -> None:
        """Set spec_token_ids (and spec_probs) of every running request: drafts for those decoding
        with speculation on, none for the rest."""
        wanted: dict[str, list[tuple[Request, int]]] = {"ngram": [], "draft": []}
        decoding = [r for r in running if r.output_token_ids and r.num_computed_tokens == r.num_tokens - 1]
        budget = self.config.max_rows - len(decoding)
        for request in running:
            request.spec_token_ids, request.spec_probs = [], None
        for request in decoding:
            method = self.method(request.params)
            if method == "off" or request.matcher is not None or request.prefill_only or budget <= 0:
                continue
            p = request.params
            most = p.speculative_tokens or self.config.num_tokens
            k = min(
                most,
                round(self.accepted.get(request.request_id, most)) + 1,
                p.max_tokens - len(request.output_token_ids) - 1,  # a step makes up to k + 1 tokens
                max_model_len - request.num_tokens - 1,
                budget,
            )
            if k > 0:
                wanted[method].append((request, k))
                budget -= k
        cfg = self.config
        for request, k in wanted["ngram"]:
            request.spec_token_ids = ngram_lookup(
                request.all_token_ids, k, cfg.prompt_lookup_max, cfg.prompt_lookup_min
            )
        if self.draft is not None:
            proposed = self.draft.propose(wanted["draft"])
            for request, _ in wanted["draft"]:
                request.spec_token_ids, request.spec_probs = proposed.get(request.request_id, ([], None))

    def release(self, request_id: str) -> None:
        self.accepted.pop(request_id, None)
        if self.draft is not None:
            self.draft.release(request_id)

    def sample(
        self, requests: list[Request], logits: torch.Tensor
    ) -> list[list[tuple[int, TokenLogprob | None]]]:
        """Each sampling request's new (token, logprob)s from a step's logits (1 + k rows for a request
        with k drafts): the sampler's one token, or what verifying the drafts yields — whose accepted
        part then counts as computed."""
        plain, plain_rows, spans, row = [], [], {}, 0
        for r in requests:
            k = len(r.spec_token_ids)
            if k:
                spans[r.request_id] = (row, row + k + 1)
            else:
                plain.append(r)
                plain_rows.append(row)
            row += k + 1
        sampled = {}
        if plain:
            rows = logits[torch.tensor(plain_rows, dtype=torch.long, device=logits.device)]
            sampled = {r.request_id: [s] for r, s in zip(plain, self.sampler(rows, plain), strict=True)}
        for r in requests:
            if r.spec_token_ids:
                lo, hi = spans[r.request_id]
                tokens = self.verify(r, logits[lo:hi])
                r.num_computed_tokens += len(tokens) - 1  # the accepted drafts' KV is the sequence's
                r.spec_token_ids, r.spec_probs = [], None
                sampled[r.request_id] = tokens
        return [sampled[r.request_id] for r in requests]

    def verify(self, request: Request, logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """The tokens a step of request's drafts yields: logits [k+1, V] are the model's rows for its last
        token and its k drafts. Records the method's acceptance."""
        drafts, q = request.spec_token_ids, request.spec_probs
        p = request.params
        raw = logits.log_softmax(-1) if p.logprobs is not None else None
        out: list[tuple[int, TokenLogprob | None]] = []
        outputs = request.output_token_ids
        base = len(outputs)
        try:
            for i in range(len(drafts) + 1):
                row = self.sampler.adjusted(logits[i : i + 1], [request])  # sees the tokens accepted so far
                accepted = False
                if p.greedy:
                    token = int(self.sampler._argmax(row)[0])
                    accepted = i < len(drafts) and token == drafts[i]
                else:
                    target = distribution(row, [request])[0]
                    if i < len(drafts):
                        d = drafts[i]
                        qd = float(q[i, d]) if q is not None else 1.0
                        u = float(torch.rand((), generator=request.generator))
                        accepted = u * qd < float(target[d])
                        if accepted:
                            token = d
                        else:
                            residual = (target - q[i]).clamp_min(0) if q is not None else target.clone()
                            if q is None:
                                residual[d] = 0.0
                            if not float(residual.sum()) > 0:
                                residual = target
                            token = int(race(residual[None], [request.generator])[0])
                    else:
                        token = int(race(target[None], [request.generator])[0])
                lp = logprob(raw[i], token, p.logprobs) if raw is not None else None
                out.append((token, lp))
                outputs.append(token)  # the next row's penalties and min_tokens see it
                if not accepted:
                    break
        finally:
            del outputs[base:]
        stats = self.stats[self.method(p)]
        stats.drafts += 1
        stats.draft_tokens += len(drafts)
        stats.accepted_tokens += len(out) - 1
        before = self.accepted.get(request.request_id, len(out) - 1)
        self.accepted[request.request_id] = 0.7 * before + 0.3 * (len(out) - 1)
        return out
