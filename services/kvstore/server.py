"""The KV-cache store service (`tandem serve kvstore`): shared/kvstore's KVStore behind gRPC.

Put and Get stream blocks in the wire format of shared/core/kv_wire.py. Status codes:
an unknown key NOT_FOUND, a block of another layout than asked FAILED_PRECONDITION, a malformed
stream (data before a header, sizes that do not add up, a chunk over the limit, a payload that does
not match its dtype and shape) INVALID_ARGUMENT, a memory tier full of pinned blocks
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio

import grpc

from shared.core import kv_wire as wire
from shared.kvstore import BlockMeta, KVStore, StoreError
from shared.telemetry.metrics import Snapshot, counter, family, gauge
from tandem.v1 import kvstore_pb2 as pb
from tandem.v1 import kvstore_pb2_grpc

SERVICE_NAME = "tandem.v1.KVStore"
MAX_BLOCK_BYTES = 256 * 2**20  # one block's payload (all layers' K and V of block_size tokens)
STATUS = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "layout": grpc.StatusCode.FAILED_PRECONDITION,
    "full": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}


def store_metrics(store: KVStore):
    """The store's counters and contents, per tier, at scrape time."""
    s = store.stats()
    tiers = ["memory", "redis"] if s["redis"] else ["memory"]
    hits = family("counter", "kvstore_hits", "Block reads served, by tier.", ["tier"])
    read = family("counter", "kvstore_bytes_read", "Block bytes served, by tier.", ["tier"])
    for tier in tiers:
        hits.add_metric([tier], s[f"{tier}_hits"])
        read.add_metric([tier], s[f"{tier}_bytes_read"])
    evictions = family("counter", "kvstore_evictions", "Blocks evicted from a tier (LRU).", ["tier"])
    evictions.add_metric(["memory"], s["evictions"])
    blocks = family("gauge", "kvstore_blocks", "Blocks held, by tier (Redis: not counted).", ["tier"])
    blocks.add_metric(["memory"], s["memory_blocks"])
    used = family("gauge", "kvstore_bytes", "Bytes held, by tier.", ["tier"])
    used.add_metric(["memory"], s["memory_bytes"])
    return [
        hits, read, evictions, blocks, used,
        counter("kvstore_misses", "Block reads no tier could serve.", {}, s["misses"]),
        counter("kvstore_puts", "Blocks put.", {}, s["puts"]),
        counter("kvstore_bytes_written", "Block bytes put.", {}, s["bytes_written"]),
        gauge("kvstore_memory_budget_bytes", "The memory tier's byte budget.", {}, s["memory_budget"]),
        gauge("kvstore_pinned_blocks", "Blocks pinned by handoff leases (not evictable).", {}, s["pinned_blocks"]),
        gauge("kvstore_leases", "Open handoff leases.", {}, s["leases"]),
        counter("kvstore_lease_expiries", "Leases that expired before a release.", {}, s["lease_expiries"]),
        counter("kvstore_redis_errors", "Redis calls that failed (the store went on without Redis).", {},
                s["redis_errors"]),
        gauge("kvstore_degraded", "1 while Redis is configured but failing: the memory tier serves alone.", {},
              int(s["degraded"])),
    ]  # fmt: skip


class KVStoreService(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: KVStore):
        self.store = store

    async def _call(self, context, fn, *args):
        """Run a store operation off the event loop (Redis calls block); map its errors."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreError as e:
            await context.abort(STATUS[e.kind], str(e))

    async def Lookup(self, request, context):
        memory, anywhere = await self._call(context, self.store.lookup, list(request.keys))
        return pb.LookupResponse(memory=memory, any_tier=anywhere)

    async def Put(self, request_iterator, context):
        stored = 0
        try:
            async for header, data in wire.blocks(request_iterator, MAX_BLOCK_BYTES):
                meta = BlockMeta(header.layout, header.dtype, tuple(header.shape))
                await self._call(context, self.store.put, header.key, meta, bytes(data))
                stored += 1
        except wire.WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.PutResponse(stored=stored)

    async def Get(self, request, context):
        for key in request.keys:
            meta, data = await self._call(context, self.store.get, key, request.layout or None)
            for chunk in wire.frames(key, meta.layout, meta.dtype, meta.shape, data):
                yield chunk

    async def Delete(self, request, context):
        return pb.DeleteResponse(deleted=await self._call(context, self.store.delete, list(request.keys)))

    async def Lease(self, request, context):
        lease_id, pinned = await self._call(context, self.store.lease, list(request.keys), request.ttl_s)
        return pb.LeaseResponse(lease_id=lease_id, pinned=pinned)

    async def Release(self, request, context):
        return pb.ReleaseResponse(released=await self._call(context, self.store.release, request.lease_id))

    async def Stats(self, request, context):
        return pb.StoreStats(**(await self._call(context, self.store.stats)))


async def start_server(store: KVStore, host: str = "127.0.0.1", port: int = 0, metrics_port: int | None = 0):
    from shared.rpc.server import GrpcServer

    server = GrpcServer("kvstore", host, port, metrics_port=metrics_port)
    server.registry.register(Snapshot(lambda: store_metrics(store)))
    server.add(kvstore_pb2_grpc.add_KVStoreServicer_to_server, KVStoreService(store), SERVICE_NAME)
    await server.start()
    return server
