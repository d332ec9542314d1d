"""The tensor dtypes Tandem serves and moves (engine weights and KV, the KV store's blocks, config
and CLI choices), by name; the torch dtype is looked up only where torch is loaded."""

from __future__ import annotations

#: name -> bytes per element
ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = tuple(ITEM_BYTES)


def torch_dtype(name: str):
    """The torch dtype called `name` (ValueError naming the known ones otherwise)."""
    import torch

    if name not in ITEM_BYTES:
        raise ValueError(f"unknown dtype '{name}' (known: {', '.join(DTYPE_NAMES)})")
    return getattr(torch, name)
