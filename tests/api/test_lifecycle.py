"""Health, startup, overload, deadlines and cancellation, model and cluster metadata."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import moecluster_pb2 as pb
from cluster import moecluster_pb2_grpc as pb_grpc
from cluster.engine import Engine, EngineConfig
from cluster.server import SERVICE_NAME
from tests.api.conftest import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Long enough to be running when the test interrupts it (a tiny step takes a few ms).
LONG = pb.SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_starting_then_serving(start_server, tiny_air):
    """Before an engine is attached: NOT_SERVING and UNAVAILABLE; after: SERVING and answers."""
    server = start_server(engine=False)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        assert health_status(channel) == NOT_SERVING
        assert health_status(channel, SERVICE_NAME) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in info.value.details()

        server.attach(Engine.create_local(EngineConfig(checkpoint=str(tiny_air))))
        assert health_status(channel) == SERVING
        assert health_status(channel, SERVICE_NAME) == SERVING
        reply = stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=3)),
                              timeout=10)
        assert reply.usage.completion_tokens >= 1


def test_lost_engine_is_unavailable(start_server):
    """An engine that stopped (lost its workers) answers UNAVAILABLE and health turns NOT_SERVING."""
    server = start_server(health_poll_s=0.05)
    with grpc.insecure_channel(server.target) as channel:
        assert health_status(channel) == SERVING
        server.call(server.engine.stop())
        wait_until(lambda: health_status(channel) == NOT_SERVING, what="NOT_SERVING")
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.MoeClusterStub(channel).Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_queue_full_is_resource_exhausted(start_server):
    server = start_server(engine={"max_num_seqs": 1, "max_waiting_requests": 1})
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        running = stub.GenerateStream(pb.GenerateRequest(prompt="a", sampling=LONG), timeout=60)
        next(running)  # admitted and running
        waiting = stub.GenerateStream(pb.GenerateRequest(prompt="b", sampling=LONG), timeout=60)
        wait_until(lambda: server.engine.status()["queue"]["waiting"] == 1, what="a waiting request")
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(prompt="c"), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in info.value.details()
        running.cancel()
        waiting.cancel()
        wait_until(lambda: server.kv_blocks_in_use() == 0, what="KV blocks freed")


def test_cancelled_stream_frees_kv_blocks(api, channel):
    stub = pb_grpc.MoeClusterStub(channel)
    assert api.kv_blocks_in_use() == 0
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="Tell me a long story", sampling=LONG), timeout=60)
    for _ in range(5):
        next(stream)
    assert api.kv_blocks_in_use() > 0
    stream.cancel()
    wait_until(lambda: api.kv_blocks_in_use() == 0, what="KV blocks freed after cancel")
    assert api.engine.status()["queue"] == {"waiting": 0, "running": 0}


def test_expired_deadline_frees_kv_blocks(api, stub):
    for method in (stub.Generate, stub.GenerateStream):
        with pytest.raises(grpc.RpcError) as info:
            result = method(pb.GenerateRequest(prompt="Tell me a long story", sampling=LONG), timeout=0.5)
            if method is stub.GenerateStream:
                list(result)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: api.kv_blocks_in_use() == 0, what="KV blocks freed after the deadline")
        assert api.engine.status()["queue"] == {"waiting": 0, "running": 0}


def test_cancel_while_other_streams_continue(api, channel):
    """Cancelling one stream leaves the others running to completion."""
    stub = pb_grpc.MoeClusterStub(channel)
    short = pb.SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    results: list[int] = []

    def finish_one() -> None:
        results.append(sum(len(r.token_ids) for r in stub.GenerateStream(
            pb.GenerateRequest(prompt="other", sampling=short), timeout=60)))

    victim = stub.GenerateStream(pb.GenerateRequest(prompt="victim", sampling=LONG), timeout=60)
    next(victim)
    others = [threading.Thread(target=finish_one) for _ in range(3)]
    for t in others:
        t.start()
    victim.cancel()
    for t in others:
        t.join(60)
    assert results == [40, 40, 40]
    wait_until(lambda: api.kv_blocks_in_use() == 0, what="KV blocks freed")


def test_model_info(api, stub):
    config = api.engine.model_config
    models = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    assert [m.name for m in models] == [api.engine.model_name]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info == models[0]
    assert info.architecture == "Glm4MoeForCausalLM"
    assert info.model_type == "glm4_moe"
    assert info.context_length == config.max_position_embeddings == 2048
    assert info.parameters.total == config.parameter_counts()["total"]
    assert info.parameters.active < info.parameters.total
    assert info.n_routed_experts == 16 and info.num_experts_per_tok == 4
    assert stub.GetModelInfo(pb.GetModelInfoRequest(name=api.engine.model_name), timeout=5) == info


def test_cluster_status(api, stub):
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5)
    assert status.ready
    assert status.model == api.engine.model_name
    assert [(w.role, w.index, w.state) for w in status.workers] == [("attention+expert", 0, "ready")]
    assert len(status.placement.experts) == 16
    assert status.kv[0].num_blocks == status.kv[0].free_blocks > 0
    assert status.kv[0].block_size_tokens == 16
    assert status.queue.running == 0 and status.queue.max_waiting > 0
