"""The KV store service behind a real gRPC server (and a real redis-server): chunked put/get of
blocks bigger than a chunk, lookups per tier, leases, restarts on the same Redis, and a clear gRPC
status for each kind of bad input."""

from __future__ import annotations

import grpc
import pytest
import redis

from services.kvstore.server import start_server
from services.platform.cli.main import main
from shared.core.kv_wire import CHUNK_BYTES
from shared.kvstore import KVStore
from tandem.v1 import kvstore_pb2 as pb
from tandem.v1 import kvstore_pb2_grpc

LAYOUT = "float32/1L/1x1/B1"


def blocks_stream(items):
    """(key, payload, shape) -> header + data chunks, as a client sends them."""
    for key, data, shape in items:
        yield pb.BlockChunk(
            header=pb.BlockHeader(key=key, layout=LAYOUT, dtype="float32", shape=shape, nbytes=len(data))
        )
        for i in range(0, len(data), CHUNK_BYTES):
            yield pb.BlockChunk(data=data[i : i + CHUNK_BYTES])


def fetch(stub, keys, layout=""):
    out, header, buf = {}, None, b""
    for chunk in stub.Get(pb.GetRequest(keys=keys, layout=layout)):
        if chunk.WhichOneof("part") == "header":
            if header is not None:
                out[header.key] = buf
            header, buf = chunk.header, b""
        else:
            buf += chunk.data
    if header is not None:
        out[header.key] = buf
    return out


@pytest.fixture(scope="module")
def store_server(loop, redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    server = loop.run(start_server(KVStore(8 * 2**20, redis_url)))
    yield server, redis_url
    loop.run(server.stop())


def test_put_get_lookup_lease_stats(store_server, loop):
    server, redis_url = store_server
    stub = kvstore_pb2_grpc.KVStoreStub(grpc.insecure_channel(server.address))
    big = bytes(range(256)) * (5 * 2**20 // 256)  # 5 MiB: two chunks
    small = b"\x01" * 400
    items = [(b"k-big", big, [len(big) // 4]), (b"k-small", small, [100])]
    assert stub.Put(blocks_stream(items)).stored == 2
    assert fetch(stub, [b"k-small", b"k-big"], LAYOUT) == {b"k-small": small, b"k-big": big}
    assert stub.Lookup(pb.LookupRequest(keys=[b"k-big", b"k-small", b"nope"])) == pb.LookupResponse(
        memory=2, any_tier=2
    )
    lease = stub.Lease(pb.LeaseRequest(keys=[b"k-small"], ttl_s=30))
    assert lease.pinned == 1 and stub.Stats(pb.StoreStatsRequest()).pinned_blocks == 1
    assert stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id)).released
    stats = stub.Stats(pb.StoreStatsRequest())
    assert stats.pinned_blocks == 0 and stats.redis and stats.puts == 2

    # a store restarted on the same Redis serves the blocks again (from Redis, then memory)
    restarted = loop.run(start_server(KVStore(8 * 2**20, redis_url)))
    try:
        stub2 = kvstore_pb2_grpc.KVStoreStub(grpc.insecure_channel(restarted.address))
        assert stub2.Lookup(pb.LookupRequest(keys=[b"k-small"])) == pb.LookupResponse(memory=0, any_tier=1)
        assert fetch(stub2, [b"k-small"]) == {b"k-small": small}
        assert stub2.Stats(pb.StoreStatsRequest()).redis_hits == 1
        assert stub2.Delete(pb.DeleteRequest(keys=[b"k-small"])).deleted == 1
    finally:
        loop.run(restarted.stop())


def test_bad_input_gets_a_clear_status(store_server):
    server, _ = store_server
    stub = kvstore_pb2_grpc.KVStoreStub(grpc.insecure_channel(server.address))
    stub.Put(blocks_stream([(b"k1", b"\0" * 8, [2])]))

    def status(fn):
        with pytest.raises(grpc.RpcError) as e:
            fn()
        return e.value.code(), e.value.details()

    code, msg = status(lambda: fetch(stub, [b"unknown"]))
    assert code == grpc.StatusCode.NOT_FOUND and "not in the store" in msg
    code, msg = status(lambda: fetch(stub, [b"k1"], "bfloat16/1L/1x1/B1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "layout" in msg
    code, msg = status(lambda: stub.Put(iter([pb.BlockChunk(data=b"x")])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "before any block header" in msg
    header = pb.BlockHeader(key=b"k2", layout=LAYOUT, dtype="float32", shape=[(CHUNK_BYTES + 4) // 4],
                            nbytes=CHUNK_BYTES + 4)  # fmt: skip
    code, msg = status(
        lambda: stub.Put(iter([pb.BlockChunk(header=header), pb.BlockChunk(data=b"\0" * (CHUNK_BYTES + 4))]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "oversized chunk" in msg
    header = pb.BlockHeader(key=b"k3", layout=LAYOUT, dtype="float32", shape=[2], nbytes=8)
    code, msg = status(lambda: stub.Put(iter([pb.BlockChunk(header=header), pb.BlockChunk(data=b"\0" * 5)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5 bytes sent" in msg
    header = pb.BlockHeader(key=b"k4", layout=LAYOUT, dtype="float32", shape=[3], nbytes=8)
    code, msg = status(lambda: stub.Put(iter([pb.BlockChunk(header=header), pb.BlockChunk(data=b"\0" * 8)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 12" in msg
    code, msg = status(lambda: stub.Lease(pb.LeaseRequest(keys=[b"k1"], ttl_s=0)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Stats(pb.StoreStatsRequest()).pinned_blocks == 0


def test_serve_kvstore_with_unreachable_redis_fails_fast(capsys):
    assert main(["serve", "kvstore", "--redis", "redis://127.0.0.1:1/0"]) == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err
