"""TokenLogprob: a generated token's log-probability and its top alternatives, as every layer passes
it on (engine output, gRPC chunks, OpenAI's logprobs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the top-n alternatives (token id, logprob)
