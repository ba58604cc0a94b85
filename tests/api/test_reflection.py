"""Server reflection: a client with no stubs discovers the API and calls it (what grpcurl does)."""

from __future__ import annotations

from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.server import SERVICE_NAME


def test_reflection_lists_services(channel):
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


def test_call_through_reflected_descriptors(channel, api):
    """List methods, build request and response classes from the reflected schema, and generate."""
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE_NAME)
    assert {m.name for m in service.methods} == {"Generate", "GenerateStream", "ListModels", "GetModelInfo",
                                                 "GetClusterStatus"}
    method = service.methods_by_name["Generate"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = request_cls(prompt="Hello", sampling={"max_new_tokens": 4, "temperature": 0.0})
    rpc = channel.unary_unary(f"/{SERVICE_NAME}/Generate", request_serializer=request_cls.SerializeToString,
                              response_deserializer=response_cls.FromString)
    reply = rpc(request, timeout=10)
    assert reply.usage.completion_tokens == len(reply.token_ids) >= 1
