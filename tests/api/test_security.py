"""Bearer-token auth and TLS: who is rejected and who gets through."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import moecluster_pb2 as pb
from cluster import moecluster_pb2_grpc as pb_grpc
from cluster.auth import call_metadata
from tests.api.conftest import self_signed_cert

TOKEN = "s3cret-token"
SHORT = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=2))


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_token_auth(start_server):
    server = start_server(token=TOKEN)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        for metadata in ((), call_metadata("wrong"), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(SHORT, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GenerateStream(SHORT, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)) \
            == grpc.StatusCode.UNAUTHENTICATED

        reply = stub.Generate(SHORT, metadata=call_metadata(TOKEN), timeout=10)
        assert reply.usage.completion_tokens >= 1
        assert len(list(stub.GenerateStream(SHORT, metadata=call_metadata(TOKEN), timeout=10))) >= 1
        # Probes cannot send metadata: health is open.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tls(start_server, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    server = start_server(tls_cert_file=str(cert), tls_key_file=str(key), token=TOKEN)
    trusted = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(server.target, trusted) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        assert stub.Generate(SHORT, metadata=call_metadata(TOKEN), timeout=10).usage.completion_tokens >= 1
        assert code_of(lambda: stub.Generate(SHORT, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    # A plaintext client, and a client that does not trust the certificate, never get an answer.
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        assert code_of(lambda: stub.Generate(SHORT, metadata=call_metadata(TOKEN), timeout=5)) \
            == grpc.StatusCode.UNAVAILABLE
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed_cert(tmp_path / "other")
    untrusted = grpc.ssl_channel_credentials(root_certificates=other_cert.read_bytes())
    with grpc.secure_channel(server.target, untrusted) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        assert code_of(lambda: stub.Generate(SHORT, metadata=call_metadata(TOKEN), timeout=5)) \
            == grpc.StatusCode.UNAVAILABLE
