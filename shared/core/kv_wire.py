"""How KV blocks cross the KV store's gRPC streams (Put's requests, Get's responses): each block is a
BlockChunk with its header (key, layout, dtype, shape, nbytes), then data chunks of at most
CHUNK_BYTES that add up to exactly nbytes. `frames` writes a block; `blocks` reads a stream back into
whole blocks and refuses a malformed one (WireError) — the client and the service share both, so the
two ends cannot drift apart. Torch-free: payload bytes only (shared/engine/kv_transfer.py turns
tensors into bytes and back).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence

from shared.core.kv_hash import BlockKey
from tandem.v1 import kvstore_pb2 as pb

CHUNK_BYTES = 2**20  # the largest data chunk


class WireError(ValueError):
    """A malformed block stream (the service answers INVALID_ARGUMENT)."""


def frames(
    key: BlockKey, layout: str, dtype: str, shape: Sequence[int], data: bytes
) -> Iterator[pb.BlockChunk]:
    """One block on the wire: its header, then its bytes in chunks."""
    yield pb.BlockChunk(
        header=pb.BlockHeader(key=key, layout=layout, dtype=dtype, shape=list(shape), nbytes=len(data))
    )
    view = memoryview(data)
    for i in range(0, len(data), CHUNK_BYTES):
        yield pb.BlockChunk(data=bytes(view[i : i + CHUNK_BYTES]))


async def blocks(
    chunks: AsyncIterable[pb.BlockChunk], max_block_bytes: int | None = None
) -> AsyncIterator[tuple[pb.BlockHeader, bytearray]]:
    """Whole blocks (header, payload) from a stream of chunks, each as soon as it is complete."""
    header: pb.BlockHeader | None = None
    buf = bytearray()
    async for chunk in chunks:
        part = chunk.WhichOneof("part")
        if part == "header":
            if header is not None:
                yield _whole(header, buf)
            header, buf = chunk.header, bytearray()
            if not header.key:
                raise WireError("a block header needs a key")
            if max_block_bytes is not None and header.nbytes > max_block_bytes:
                raise WireError(f"a block of {header.nbytes} bytes is over the limit of {max_block_bytes}")
        elif part == "data":
            if header is None:
                raise WireError("data chunk before any block header")
            if len(chunk.data) > CHUNK_BYTES:
                raise WireError(f"oversized chunk: {len(chunk.data)} bytes, the limit is {CHUNK_BYTES}")
            buf += chunk.data
            if len(buf) > header.nbytes:  # more than announced: stop buffering now
                raise WireError(
                    f"block {header.key.hex()[:16]}…: more than the {header.nbytes} bytes its header says"
                )
    if header is not None:
        yield _whole(header, buf)


def _whole(header: pb.BlockHeader, buf: bytearray) -> tuple[pb.BlockHeader, bytearray]:
    if len(buf) != header.nbytes:
        raise WireError(f"block {header.key.hex()[:16]}…: {len(buf)} bytes sent, header says {header.nbytes}")
    return header, buf
