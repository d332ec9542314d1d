"""KVStoreClient: what workers and the router use to talk to the KV-cache store service (asyncio).

    store = KVStoreClient("127.0.0.1:50070")
    memory, anywhere = await store.lookup(keys)
    await store.put_blocks(keys, payload, layout)          # payload [blocks, *block_shape]
    payload = await store.get_blocks(keys, layout)         # the same tensor back
    lease_id, pinned = await store.lease(keys, ttl_s=30); await store.release(lease_id)

Blocks travel in the store's wire format (shared/core/kv_wire.py); a payload tensor is turned into bytes once per
block on the way out and viewed (not copied again) on the way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.core import kv_wire as wire
from shared.core.kv_hash import BlockKey
from shared.rpc.security import channel
from tandem.v1 import kvstore_pb2 as pb
from tandem.v1 import kvstore_pb2_grpc

if TYPE_CHECKING:
    import torch


class KVStoreClient:
    def __init__(self, address: str, timeout: float = 30.0):
        self.address = address
        self.timeout = timeout
        self.channel = channel(address)
        self.stub = kvstore_pb2_grpc.KVStoreStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def lookup(self, keys: list[BlockKey]) -> tuple[int, int]:
        """How many leading keys the store has: (in memory, in any tier)."""
        if not keys:
            return 0, 0
        resp = await self.stub.Lookup(pb.LookupRequest(keys=keys), timeout=self.timeout)
        return resp.memory, resp.any_tier

    async def put_blocks(self, keys: list[BlockKey], payload: torch.Tensor, layout: str) -> int:
        """Store payload[i] under keys[i]; returns how many blocks were stored."""
        import torch  # (the tensor paths only: the router uses this client without torch)

        from shared.engine.kv_transfer import dtype_name

        if not keys:
            return 0
        if payload.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys for a payload of {payload.shape[0]} blocks")
        payload = payload.detach().to("cpu").contiguous()
        dtype, shape = dtype_name(payload.dtype), list(payload.shape[1:])

        def chunks():
            for key, block in zip(keys, payload, strict=True):
                yield from wire.frames(key, layout, dtype, shape, block.view(torch.uint8).numpy().tobytes())

        return (await self.stub.Put(chunks(), timeout=self.timeout)).stored

    async def get_blocks(self, keys: list[BlockKey], layout: str) -> torch.Tensor:
        """The blocks under `keys`, stacked: [len(keys), *block_shape]. Raises grpc.aio.AioRpcError
        (NOT_FOUND, FAILED_PRECONDITION for another layout) when one is missing or does not fit."""
        import torch

        from shared.engine.kv_transfer import from_wire

        call = self.stub.Get(pb.GetRequest(keys=keys, layout=layout), timeout=self.timeout)
        blocks = [
            from_wire(header.dtype, tuple(header.shape), data) async for header, data in wire.blocks(call)
        ]
        if len(blocks) != len(keys):
            raise ValueError(f"asked the store for {len(keys)} blocks, got {len(blocks)}")
        return torch.stack(blocks) if blocks else torch.empty(0)

    async def lease(self, keys: list[BlockKey], ttl_s: float) -> tuple[str, int]:
        """(lease id, how many of `keys`, from the first, are pinned)."""
        resp = await self.stub.Lease(pb.LeaseRequest(keys=keys, ttl_s=ttl_s), timeout=self.timeout)
        return resp.lease_id, resp.pinned

    async def release(self, lease_id: str) -> bool:
        if not lease_id:
            return False
        resp = await self.stub.Release(pb.ReleaseRequest(lease_id=lease_id), timeout=self.timeout)
        return resp.released

    async def stats(self) -> pb.StoreStats:
        return await self.stub.Stats(pb.StoreStatsRequest(), timeout=self.timeout)
