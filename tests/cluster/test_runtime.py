"""The model split over Ray actors: parity with the single process, shards, malformed frames, faults."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import ray
import torch
import zmq

from cluster.errors import WorkerFailure
from cluster.runtime import Cluster, ClusterConfig
from router import wire
from workers.batch import SequenceChunk, build_batch
from workers.experts import LocalExperts, expert_predicate
from workers.generate import generate, load_model
from workers.kv_cache import PagedKVCache

pytestmark = pytest.mark.slow
NEW_TOKENS = 32
TOLERANCE = 1e-4


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (3, 19, 1, 8, 27)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("glm45")


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = load_model(checkpoint)
    return model, generate(model, _prompts(model.config.vocab_size), NEW_TOKENS, keep_logits=True)


@pytest.fixture
def start_cluster(local_ray, checkpoint):
    started: list[Cluster] = []

    def start(**kwargs) -> Cluster:
        cluster = Cluster.start(ClusterConfig(str(checkpoint), address="local", **kwargs))
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.shutdown()


@pytest.mark.parametrize(("num_attention", "num_expert", "micro_batches"),
                         [(1, 1, 1), (1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2)])
def test_cluster_matches_single_process(start_cluster, reference, num_attention, num_expert, micro_batches):
    model, ref = reference
    cluster = start_cluster(num_attention_workers=num_attention, num_expert_workers=num_expert,
                            micro_batches=micro_batches)
    got = cluster.generate(_prompts(model.config.vocab_size), NEW_TOKENS, keep_logits=True)
    assert got.token_ids == ref.token_ids
    for mine, theirs in zip(got.logits, ref.logits, strict=True):
        assert max((a - b).abs().max().item() for a, b in zip(mine, theirs, strict=True)) <= TOLERANCE
    if num_attention == 2:  # both attention workers really dispatched to the shared expert workers
        assert all(c["links"] for c in cluster.counters()["attention"])


class _RecordingExperts(LocalExperts):
    def __init__(self, shard):
        super().__init__(shard)
        self.topk: dict[int, torch.Tensor] = {}

    def submit(self, layer, x, topk_ids, topk_weights):
        self.topk[layer] = topk_ids.clone()
        return super().submit(layer, x, topk_ids, topk_weights)


def test_expert_workers_hold_only_their_experts_and_receive_the_routed_tokens(start_cluster, reference):
    model, _ = reference
    config = model.config
    cluster = start_cluster(num_expert_workers=4)
    for worker, actor in enumerate(cluster.experts):
        mine = cluster.placement.experts_of(worker)
        names = ray.get(actor.tensor_names.remote())
        assert set(names) == {n for n in names if expert_predicate(config, mine)(n)}
        assert len(names) == 3 * len(mine) * len(config.moe_layer_indices)

    recorder = _RecordingExperts(model.model.layers[1].mlp.experts.shard)
    model.set_expert_backend(recorder)
    try:
        prompt = _prompts(config.vocab_size)[1]
        kv = PagedKVCache(config, 8, 16)
        model.forward(build_batch([SequenceChunk(prompt, 0, kv.allocator.allocate(2))], 16), kv)
    finally:
        model.set_expert_backend(LocalExperts(recorder.shard))
    cluster.forward(0, [SequenceChunk(prompt, 0, cluster.allocators[0].allocate(2))])
    for layer in config.moe_layer_indices[:-1]:  # the MTP layer does not run in a main forward
        expected = torch.bincount(recorder.topk[layer].reshape(-1), minlength=config.n_routed_experts)
        received = torch.zeros(config.n_routed_experts, dtype=torch.long)
        for worker, actor in enumerate(cluster.experts):
            counts = torch.tensor(ray.get(actor.tokens_per_expert.remote(layer)))
            outside = [e for e in range(config.n_routed_experts) if e not in cluster.placement.experts_of(worker)]
            assert counts[outside].sum() == 0, f"worker {worker} received tokens for experts it does not hold"
            received += counts
        assert received.tolist() == expected.tolist()


def _raw_request(endpoint: str, frames: list[bytes]) -> wire.Message:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        return wire.decode(sock.recv_multipart())
    finally:
        sock.close()


def test_malformed_frames_get_an_error_reply_and_the_worker_keeps_serving(start_cluster, reference):
    model, ref = reference
    cluster = start_cluster(num_expert_workers=2)
    endpoint = cluster.endpoints[0]
    x, pairs = torch.zeros(1, model.config.hidden_size), wire.pack_pairs(torch.zeros(1), torch.zeros(1), torch.ones(1))

    def frames(layer: int) -> list[bytes]:
        return [bytes(memoryview(f)) for f in wire.encode(wire.Dispatch(1, layer, x, pairs))]

    cases = {
        "bad header": [b"\xc1 not msgpack"],
        "wrong sizes": [frames(1)[0], frames(1)[1][:-4], frames(1)[2]],
        "unknown layer": frames(999),
    }
    for case, request in cases.items():
        reply = _raw_request(endpoint, request)
        assert isinstance(reply, wire.ErrorReply) and reply.reason, case
    got = cluster.generate(_prompts(model.config.vocab_size), NEW_TOKENS)
    assert got.token_ids == ref.token_ids


def _port_is_free(endpoint: str) -> bool:
    """No socket listens on the endpoint's port any more.

    SO_REUSEADDR lets the probe bind past connections in TIME_WAIT (a killed worker's kernel keeps
    them for a minute; they are not a leak) while a socket still listening makes the bind fail.
    """
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            return True
        except OSError:
            return False


def test_killed_expert_worker_raises_within_timeout_and_cluster_stops_cleanly(start_cluster, reference):
    model, _ = reference
    timeout_s = 60.0  # the dropped connection, not this timeout, must end the forward
    cluster = start_cluster(num_expert_workers=2, dispatch_timeout_s=timeout_s)
    endpoints = dict(cluster.endpoints)
    prompts = _prompts(model.config.vocab_size) * 4
    outcome: dict = {}

    def run() -> None:
        try:
            cluster.generate(prompts, 400)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
            outcome["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    ray.kill(cluster.experts[1], no_restart=True)
    killed_at = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the forward hung after an expert worker died"
    error = outcome.get("error")
    assert isinstance(error, WorkerFailure), error
    assert f"worker 1 at {endpoints[1]}" in str(error)
    assert outcome["at"] - killed_at < 10
    assert "dropped before it replied" in str(error)
    attention = list(cluster.attention)
    cluster.shutdown()
    for actor in attention:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=30)
    assert all(_port_is_free(e) for e in endpoints.values())
