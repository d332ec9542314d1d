"""Proto <-> dataclass conversions of the types every service shares (protos/tandem/v1/common.proto).

The one place outside the generated stubs that knows the wire shape of SamplingParams, TokenChunk
and friends; services convert at their edges and work with dataclasses inside.
"""

from __future__ import annotations

import dataclasses

from shared.core.logprobs import TokenLogprob
from shared.core.sampling_params import SamplingParams
from tandem.v1 import common_pb2 as pb

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "handoff": pb.FINISH_REASON_HANDOFF,
}
FINISH_REASON_NAMES = {v: k for k, v in FINISH_REASONS.items()}


_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    """Every SamplingParams field by its own name (the proto mirrors the dataclass); None: unset."""
    kw = {}
    for name in _FIELDS:
        value = getattr(p, name)
        if value is not None:
            kw[name] = (
                dict(value) if name == "logit_bias" else list(value) if isinstance(value, tuple) else value
            )
    return pb.SamplingParams(**kw)


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """An unset field takes SamplingParams' default, but an unset max_tokens means up to the context
    length (None), as in OpenAI's chat API. Validation is the caller's (it knows the vocabulary)."""
    kw = {}
    for name in _FIELDS:
        field = msg.DESCRIPTOR.fields_by_name[name]
        if field.has_presence and not msg.HasField(name):
            if name == "max_tokens":
                kw[name] = None
            continue
        value = getattr(msg, name)
        if name == "logit_bias":
            value = tuple(sorted(value.items()))
        elif field.is_repeated:
            value = tuple(value)
        kw[name] = value
    return SamplingParams(**kw)


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))
