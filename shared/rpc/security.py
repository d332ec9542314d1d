"""Who may talk to a Tandem gRPC server, and how channels to one are opened.

The internal plane (tokenizer, router, workers, KV store, controller) is closed by two optional
layers, both read from the environment so every process of a platform (Ray actors, pods, the CLI)
gets the same settings:

- a shared token (`TANDEM_INTERNAL_TOKEN`): servers refuse every call without
  `authorization: Bearer <token>` metadata with UNAUTHENTICATED (constant-time compare); only the
  standard health service stays open, for probes. Channels opened with `channel()` send it.
- TLS (`TANDEM_TLS_CERT` + `TANDEM_TLS_KEY`, and `TANDEM_TLS_CA` for mutual TLS): servers listen
  with that certificate; channels verify the server against the CA and present the same
  certificate. `TANDEM_TLS_SERVER_NAME` names the certificate's DNS name when services are reached
  by IP (one certificate for the whole platform).

Server reflection is off unless `TANDEM_GRPC_REFLECTION=1` (a debugging aid, not for production).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from shared import envs

AUTH_KEY = "authorization"
#: methods that answer without a token: the standard health service (load balancers, probes)
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
#: gRPC message size limit for every server and channel (KV payloads are chunked below it)
MAX_MESSAGE_BYTES = 64 * 2**20
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Tls:
    cert: bytes
    key: bytes
    ca: bytes | None
    server_name: str | None

    @classmethod
    def from_env(cls) -> Tls | None:
        paths = envs.tls_files()
        if paths is None:
            return None
        cert, key, ca = (Path(p).read_bytes() if p else None for p in paths)
        return cls(cert, key, ca, envs.tls_server_name())

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def _token_ok(metadata, token: str) -> bool:
    expected = f"Bearer {token}".encode()
    for key, value in metadata or ():
        if key == AUTH_KEY:
            return hmac.compare_digest(str(value).encode(), expected)
    return False


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls that lack the platform's token, before the handler runs."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (
            handler is None
            or details.method in OPEN_METHODS
            or _token_ok(details.invocation_metadata, self.token)
        ):
            return handler

        async def refuse(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")

        io = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}  # fmt: skip
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(refuse, **io)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse, **io)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse, **io)
        return grpc.stream_stream_rpc_method_handler(refuse, **io)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    token = envs.internal_token()
    return [TokenInterceptor(token)] if token else []


def add_port(server, address: str) -> int:
    """Listen on `address` with TLS when configured; the bound port (0 when binding failed)."""
    tls = Tls.from_env()
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def _with_token(details, token: str):
    metadata = [m for m in (details.metadata or ()) if m[0] != AUTH_KEY] + [(AUTH_KEY, f"Bearer {token}")]
    return (
        details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)
    )


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.metadata = details.method, details.timeout, metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


async def _aio_send_token(self, continuation, details, request):
    return await continuation(_with_token(details, self.token), request)


_AIO_KINDS = {
    grpc.aio.UnaryUnaryClientInterceptor: "intercept_unary_unary",
    grpc.aio.UnaryStreamClientInterceptor: "intercept_unary_stream",
    grpc.aio.StreamUnaryClientInterceptor: "intercept_stream_unary",
    grpc.aio.StreamStreamClientInterceptor: "intercept_stream_stream",
}


def _aio_token_interceptors(token: str) -> list:
    """One interceptor per call kind, each sending the token: an asyncio channel files an
    interceptor under the first kind it implements only."""
    return [
        type(f"_Aio_{name}", (kind,), {name: _aio_send_token, "token": token})()
        for kind, name in _AIO_KINDS.items()
    ]


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self.token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self.token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self.token), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self.token), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self.token), request_iterator)


def _options(tls: Tls | None) -> list[tuple]:
    if tls is not None and tls.server_name:
        return [*OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
    return list(OPTIONS)


def channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel to a Tandem service, with the platform's TLS and token when configured."""
    tls, token = Tls.from_env(), envs.internal_token()
    interceptors = _aio_token_interceptors(token) if token else None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=_options(None), interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=_options(tls), interceptors=interceptors
    )


def sync_channel(address: str) -> grpc.Channel:
    """The blocking twin of `channel()` (for the CLI)."""
    tls, token = Tls.from_env(), envs.internal_token()
    if tls is None:
        ch = grpc.insecure_channel(address, options=_options(None))
    else:
        ch = grpc.secure_channel(address, tls.channel_credentials(), options=_options(tls))
    return grpc.intercept_channel(ch, _SyncToken(token)) if token else ch
