"""Fixtures for router tests: real expert servers on 127.0.0.1 holding random SwiGLU experts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from router.dispatcher import Dispatcher, DispatchKernels
from router.expert_server import ComputeFn, ExpertServer
from router.placement import PlacementTable
from workers import cpu_kernels

NUM_EXPERTS = 8
HIDDEN = 32
INTERMEDIATE = 16
LAYERS = (1, 3)


@dataclass(frozen=True)
class Expert:
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


Weights = dict[int, list[Expert]]  # layer -> expert id -> weights


def make_weights(seed: int = 0) -> Weights:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    return {
        layer: [
            Expert(rand(INTERMEDIATE, HIDDEN), rand(INTERMEDIATE, HIDDEN), rand(HIDDEN, INTERMEDIATE))
            for _ in range(NUM_EXPERTS)
        ]
        for layer in LAYERS
    }


def reference(
    weights: Weights, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """sum_k w_k * Expert_{id_k}(x_t), every expert computed on every token."""
    every = torch.stack([expert(x.float()) for expert in weights[layer]], dim=1)  # [T, E, H]
    picked = every.gather(1, topk_ids.unsqueeze(-1).expand(-1, -1, x.shape[1]))  # [T, K, H]
    return (picked * topk_weights.unsqueeze(-1)).sum(dim=1)


def shard_compute(weights: Weights, held: set[int]) -> ComputeFn:
    """What an expert worker would pass: the SwiGLU of the experts it holds, weighted and summed per row."""

    def compute(
        layer: int, x: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor
    ) -> torch.Tensor:
        experts = weights[layer]  # KeyError for a layer this worker does not serve
        y = torch.zeros(x.shape, dtype=torch.float32)
        for expert in pair_expert.unique().tolist():
            if expert not in held:
                raise KeyError(f"expert {expert} is not held by this worker")
            mask = pair_expert == expert
            rows = pair_token[mask].long()
            y.index_add_(0, rows, pair_weight[mask].unsqueeze(1) * experts[expert](x[rows].float()))
        return y

    return compute


def random_routing(num_tokens: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    topk_ids = torch.rand(num_tokens, NUM_EXPERTS, generator=gen).argsort(dim=1)[:, :k]
    topk_weights = torch.rand(num_tokens, k, generator=gen)
    return x, topk_ids, topk_weights / topk_weights.sum(dim=1, keepdim=True)


@pytest.fixture
def weights() -> Weights:
    return make_weights()


@pytest.fixture
def start_servers(weights: Weights, kernels: DispatchKernels | None) -> Iterator[Callable[..., list[ExpertServer]]]:
    """start_servers(placement, compute=None) -> one started ExpertServer per worker; all stopped at teardown.

    With the C++ `kernels` the servers read dispatches with the C++ reader, as an expert worker's do."""
    started: list[ExpertServer] = []
    decode_dispatch = None if kernels is None else cpu_kernels.decode_dispatch()

    def start(placement: PlacementTable, compute: ComputeFn | None = None) -> list[ExpertServer]:
        servers = []
        for worker in range(placement.num_workers):
            fn = compute or shard_compute(weights, set(placement.experts_of(worker)))
            server = ExpertServer(fn, num_experts=placement.num_experts, decode_dispatch=decode_dispatch)
            started.append(server)
            servers.append(server.start())
        return servers

    yield start
    for server in started:
        server.stop()


@pytest.fixture(params=["numpy and torch", "C++ kernels"])
def kernels(request: pytest.FixtureRequest) -> DispatchKernels | None:
    """How dispatchers plan, sum and read replies: numpy, torch and wire.decode (the default), or the C++
    kernels an attention worker passes (and the servers then read dispatches in C++ too)."""
    if request.param == "numpy and torch":
        return None
    if cpu_kernels.disabled_by_env():
        pytest.skip(f"{cpu_kernels.DISABLE_ENV} turns the C++ kernels off")
    assert cpu_kernels.available(), f"C++ CPU kernels did not load: {cpu_kernels.load_error()}"
    return cpu_kernels.dispatch_kernels()


@pytest.fixture
def make_dispatcher(kernels: DispatchKernels | None) -> Iterator[Callable[..., Dispatcher]]:
    """make_dispatcher(placement, endpoints, timeout_s=...) -> Dispatcher; all closed at teardown.

    Every test that makes dispatchers runs with both ways of planning and summing (`kernels`)."""
    made: list[Dispatcher] = []

    def make(placement: PlacementTable, endpoints: dict[int, str], timeout_s: float = 10.0) -> Dispatcher:
        dispatcher = Dispatcher(placement, endpoints, timeout_s=timeout_s, kernels=kernels)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close()
