"""SamplingParams: how one request's next tokens are chosen and when it stops.

Mirrors the OpenAI fields plus the extras vLLM users expect (top_k, min_p, repetition_penalty,
min_tokens, stop_token_ids, ignore_eos, seed, priority, cache_salt), a grammar for structured output and
the speculative-decoding opt-in. `validate` raises ValueError
naming the offending parameter, which every interface maps to its own error convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's epsilon)
INT32_MAX = 2**31 - 1
SPECULATIVE_METHODS = ("off", "ngram", "draft")  # speculative decoding: none, prompt lookup, a draft model
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length (the engine resolves it)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    frequency_penalty: float = 0.0  # OpenAI: minus penalty * count in the output
    presence_penalty: float = 0.0  # OpenAI: minus penalty if present in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to the logit)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: off; 0: the sampled token's; n: plus the top n
    stop: tuple[str, ...] = ()  # stop strings, applied by the detokenizer
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0  # lower runs first
    cache_salt: str | None = None  # separates tenants' prefix caches
    grammar: str | None = (
        None  # structured output: an llguidance grammar (Lark, or JSON-schema based) to match
    )
    speculative: str | None = (
        None  # speculative decoding: "off", "ngram", "draft"; None: the engine's default
    )
    speculative_tokens: int | None = None  # drafts verified per step; None: the engine's default

    @property
    def greedy(self) -> bool:
        # below vLLM's sampling epsilon a temperature only overflows the logits: it is argmax
        return self.temperature < SAMPLING_EPS

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):  # fmt: skip
            if not math.isfinite(getattr(self, name)):
                bad(name, f"must be a finite number, got {getattr(self, name)}")
        for name, low, high in (("max_tokens", 1, INT32_MAX), ("min_tokens", 0, INT32_MAX), ("top_k", -1, INT32_MAX),
                                ("priority", -INT32_MAX, INT32_MAX)):  # fmt: skip
            if getattr(self, name) is not None and not low <= getattr(self, name) <= high:
                bad(name, f"must be in [{low}, {high}], got {getattr(self, name)}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            bad("seed", f"must fit in 64 bits, got {self.seed}")
        for tok, bias in self.logit_bias:
            if not -100 <= bias <= 100:  # also NaN
                bad("logit_bias", f"values must be in [-100, 100], got {bias} for token {tok}")
        if self.temperature < 0:
            bad("temperature", f"must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad("top_k", f"must be -1 (off), 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.min_tokens < 0 or self.min_tokens > (
            self.max_tokens if self.max_tokens is not None else INT32_MAX
        ):
            bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            bad("speculative", f"must be one of {', '.join(SPECULATIVE_METHODS)}, got '{self.speculative}'")
        if self.speculative_tokens is not None and not 1 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            bad(
                "speculative_tokens",
                f"must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.speculative_tokens}",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if vocab_size is not None:
            for tok, _ in self.logit_bias:
                if not 0 <= tok < vocab_size:
                    bad("logit_bias", f"names token {tok}, outside the vocabulary of {vocab_size}")
            for tok in self.stop_token_ids:
                if not 0 <= tok < vocab_size:
                    bad("stop_token_ids", f"names token {tok}, outside the vocabulary of {vocab_size}")
