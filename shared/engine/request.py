"""Request: the one object that flows through the engine.

Progress is counters, not phases: a request holds all its tokens (prompt + output so far) and
`num_computed_tokens`, how many of them have K/V in the cache. Each step the scheduler gives it
some of the rest; when every token is computed the last one's logits produce a new token. Prefill,
chunked prefill, decode, resuming after preemption and continuing from imported KV are all this one
rule.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from shared.core.kv_hash import BlockKey
from shared.core.logprobs import TokenLogprob
from shared.core.sampling_params import SamplingParams

_arrivals = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_HANDOFF = "handoff"  # prefill-only: first token sampled, KV exported, decode continues elsewhere

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_HANDOFF,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    lora: str | None = None  # the LoRA adapter its tokens run with (multi-LoRA serving); None: the base
    block_keys: list[BlockKey] = field(default_factory=list)  # of the full blocks of all_token_ids
    published_blocks: int = 0  # leading blocks of block_ids already published to the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    arrival: float = field(default_factory=time.monotonic)
    order: int = field(default_factory=lambda: next(_arrivals))
    generator: torch.Generator = field(default_factory=torch.Generator)
    ever_scheduled: bool = False
    scheduled_at: float | None = None  # time.monotonic() when first scheduled (queue-time metrics)
    prefill_only: bool = False  # finish after the first token and export the KV
    pending_kv: torch.Tensor | None = None  # imported KV payload, written into the cache on admission
    detokenizer: object | None = None  # an IncrementalDetokenizer when the engine has a tokenizer
    matcher: object | None = None  # structured output: the grammar's llguidance LLMatcher (structured.py)
    # speculative decoding (speculative.py): this step's draft tokens, run after the last token and
    # counted as computed only once accepted; their draft distributions [k, V] when sampled from one
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else int(torch.randint(2**62, ()).item())
        self.generator.manual_seed(seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.params.priority, self.order)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
