"""KV handoff between a prefill-only engine and a decode engine.

A prefill-only request stops after its first sampled token and hands over everything a decode engine
needs to continue it exactly as if one engine had run it:

  payload        the KV of every prompt token: [blocks, layers, 2 (K, V), K heads, B, D], one
                 contiguous tensor — the KV block payload of ARCHITECTURE.md. payload[i] is block i;
                 the last block may be partial (`num_tokens` says how many positions are real).
  block_keys   the chain keys of the full blocks (the partial tail has none and is never shared)
  first_token    the sampled token (and its logprob, if asked for)
  rng_state      the request generator's state after sampling it, so seeded sampling continues the
                 same random stream on the decode side

`to_wire` / `from_wire` turn a payload into (dtype name, shape, bytes) and back — the header and body
the services put on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.core.dtypes import DTYPE_NAMES, torch_dtype
from shared.core.kv_hash import BlockKey
from shared.core.logprobs import TokenLogprob

_DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class KVHandoff:
    num_tokens: int  # prompt tokens whose KV is in the payload
    payload: torch.Tensor  # [blocks, layers, 2, K, B, D]
    block_keys: tuple[BlockKey, ...]
    first_token: int
    first_logprob: TokenLogprob | None
    rng_state: torch.Tensor  # torch.Generator.get_state() of the request after the first token
    layout: str  # the producing engine's KV layout; a consumer must have the same
    num_cached_tokens: int = 0  # prompt tokens the prefill engine found in its prefix cache

    @property
    def num_blocks(self) -> int:
        return self.payload.shape[0]


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def to_wire(payload: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, raw little-endian bytes) of a CPU tensor."""
    t = payload.detach().to("cpu").contiguous()
    return dtype_name(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes()


def from_wire(dtype: str, shape: tuple[int, ...], data: bytes | bytearray | memoryview) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"unknown KV dtype '{dtype}' (known: {sorted(_DTYPES)})")
    torch_dtype = _DTYPES[dtype]
    expected = torch.Size(shape).numel() * torch.tensor([], dtype=torch_dtype).element_size()
    if len(data) != expected:
        raise ValueError(
            f"KV payload of shape {tuple(shape)} {dtype} needs {expected} bytes, got {len(data)}"
        )
    if not expected:
        return torch.empty(shape, dtype=torch_dtype)
    # A bytearray is taken over as is (no copy); read-only buffers are copied once.
    raw = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
    return raw.view(torch_dtype).reshape(shape)
