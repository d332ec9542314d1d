"""The internal gRPC plane closed (issue 17): with TANDEM_INTERNAL_TOKEN every server refuses calls
without the token (UNAUTHENTICATED; only health stays open) and `shared.rpc.security.channel()` sends
it; reflection is off unless asked for; with TLS files servers speak only TLS and, with a CA, only to
clients that present a certificate. Real KV-store servers, real channels."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.kvstore.server import start_server
from shared.kvstore import KVStore
from shared.rpc.security import channel
from tandem.v1 import kvstore_pb2 as pb
from tandem.v1 import kvstore_pb2_grpc


def serve(loop):
    return loop.run(start_server(KVStore(2**20), metrics_port=None))


def stats_through_channel(loop, address: str) -> pb.StoreStats:
    """A unary call, a client stream and a server stream through the platform's channel."""

    async def call():
        ch = channel(address)
        try:
            stub = kvstore_pb2_grpc.KVStoreStub(ch)
            header = pb.BlockHeader(
                key=b"k", layout="float32/1L/1x1/B1", dtype="float32", shape=[1], nbytes=4
            )
            chunks = [pb.BlockChunk(header=header), pb.BlockChunk(data=b"\0\0\x80?")]
            assert (await stub.Put(iter(chunks), timeout=10)).stored == 1  # a client stream
            got = [c async for c in stub.Get(pb.GetRequest(keys=[b"k"]), timeout=10)]  # a server stream
            assert got[-1].data == b"\0\0\x80?"
            return await stub.Stats(pb.StoreStatsRequest(), timeout=10)
        finally:
            await ch.close()

    return loop.run(call())


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_a_token_closes_every_method_but_health(loop, monkeypatch):
    monkeypatch.setenv("TANDEM_INTERNAL_TOKEN", "s3cret-token")
    server = serve(loop)
    try:
        plain = grpc.insecure_channel(server.address)
        stub = kvstore_pb2_grpc.KVStoreStub(plain)
        assert (
            code_of(lambda: stub.Stats(pb.StoreStatsRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        )
        wrong = [("authorization", "Bearer guess")]
        assert code_of(lambda: stub.Stats(pb.StoreStatsRequest(), metadata=wrong, timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # a streaming method and a block lease under a guessed key: refused before the handler runs
        assert code_of(lambda: list(stub.Get(pb.GetRequest(keys=[b"k"]), timeout=10))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(lambda: stub.Lease(pb.LeaseRequest(keys=[b"k"], ttl_s=60), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        health = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stats_through_channel(loop, server.address).memory_budget == 2**20  # the platform's channel
    finally:
        loop.run(server.stop())


@pytest.mark.parametrize("enabled", [False, True])
def test_reflection_only_when_asked_for(loop, monkeypatch, enabled):
    monkeypatch.delenv("TANDEM_INTERNAL_TOKEN", raising=False)
    if enabled:
        monkeypatch.setenv("TANDEM_GRPC_REFLECTION", "1")
    server = serve(loop)
    try:
        refl = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.address))
        ask = lambda: next(  # noqa: E731
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        if not enabled:
            assert code_of(ask) == grpc.StatusCode.UNIMPLEMENTED
        else:
            names = {s.name for s in ask().list_services_response.service}
            assert {"tandem.v1.KVStore", "grpc.health.v1.Health"} <= names
    finally:
        loop.run(server.stop())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA and one certificate for the platform (DNS name tandem.internal, server and
    client use), as an operator would make them with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=tandem-test-ca",
    )
    run("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=tandem.internal")
    (d / "ext.cnf").write_text("subjectAltName=DNS:tandem.internal\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "tls.crt", "-days", "1", "-extfile", "ext.cnf")  # fmt: skip
    return d


def test_mutual_tls_between_services(loop, monkeypatch, pki):
    for var, name in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt")):
        monkeypatch.setenv(f"TANDEM_TLS_{var}", str(pki / name))
    monkeypatch.setenv("TANDEM_TLS_SERVER_NAME", "tandem.internal")
    server = serve(loop)
    try:
        assert stats_through_channel(loop, server.address).memory_budget == 2**20
        plaintext = kvstore_pb2_grpc.KVStoreStub(grpc.insecure_channel(server.address))
        assert (
            code_of(lambda: plaintext.Stats(pb.StoreStatsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        )
        # TLS that trusts the CA but shows no client certificate: refused by mutual TLS
        anonymous = grpc.secure_channel(
            server.address,
            grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes()),
            options=[("grpc.ssl_target_name_override", "tandem.internal")],
        )
        stub = kvstore_pb2_grpc.KVStoreStub(anonymous)
        assert code_of(lambda: stub.Stats(pb.StoreStatsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(server.stop())
