"""Transport security of the gRPC API: TLS from certificate files and a bearer token in metadata.

Both are optional and independent. The token travels as ``authorization: Bearer <token>`` on every
call; without TLS it crosses the network in the clear, so use it bare only on a trusted network.
Health checks are exempt, so load balancers and Kubernetes gRPC probes (which cannot send
metadata) can still see whether the server is ready.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

AUTH_METADATA_KEY = "authorization"
_EXEMPT_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call but health checks with UNAUTHENTICATED unless it carries the token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        if handler_call_details.method.startswith(_EXEMPT_PREFIX) or self._authorized(handler_call_details):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"missing or wrong token: send metadata '{AUTH_METADATA_KEY}: Bearer <token>'")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return kinds[(handler.request_streaming, handler.response_streaming)](abort)


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """TLS credentials from a PEM certificate (chain) and its private key."""
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with each call for ``token`` (none without one)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


def open_channel(target: str, tls_ca_file: str | Path | None = None, tls: bool = False) -> grpc.aio.Channel:
    """A client channel: TLS when ``tls`` or a CA file is given (the system roots without one)."""
    if tls or tls_ca_file:
        roots = Path(tls_ca_file).read_bytes() if tls_ca_file else None
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))
    return grpc.aio.insecure_channel(target)
