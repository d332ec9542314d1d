"""The block-key chain that names KV blocks everywhere (engine, KV store, router, workers' KV events).

A full block of `block_size` tokens is keyed by

    key_i = sha256(key_{i-1} || extras || token ids of block i)      key_{-1} = b""

where extras identify everything else the K/V depend on: the model id, the KV layout (dtype, layers,
KV heads, head dim), the LoRA adapter, and a per-tenant cache salt. Equal keys therefore mean equal
K/V, on any worker. A partial last block has no key: it is never shared.

A key is a `BlockKey` (32 bytes of SHA-256); it is called a key, or `keys` for a chain, everywhere.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockKey = NewType("BlockKey", bytes)


def kv_extras(model_id: str, layout: str, lora_id: str | None = None, cache_salt: str | None = None) -> bytes:
    return "\x1f".join((model_id, layout, lora_id or "", cache_salt or "")).encode()


def block_key(parent: bytes, tokens: Sequence[int], extras: bytes) -> BlockKey:
    h = hashlib.sha256()
    h.update(parent)
    h.update(struct.pack("<I", len(extras)))
    h.update(extras)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return BlockKey(h.digest())


def chain_keys(
    tokens: Sequence[int], block_size: int, extras: bytes, known: Sequence[BlockKey] = ()
) -> list[BlockKey]:
    """Keys of every full block of `tokens`, reusing the already computed prefix `known`."""
    keys = list(known)
    for i in range(len(keys), len(tokens) // block_size):
        parent = keys[-1] if keys else b""
        keys.append(block_key(parent, tokens[i * block_size : (i + 1) * block_size], extras))
    return keys


def prompt_block_keys(
    tokens: Sequence[int],
    block_size: int,
    model_id: str,
    layout: str,
    cache_salt: str | None = None,
    lora_id: str | None = None,
) -> list[BlockKey]:
    """Keys of a prompt's full blocks as an engine serving `model_id` with `layout` names them."""
    return chain_keys(tokens, block_size, kv_extras(model_id, layout, lora_id, cache_salt))
