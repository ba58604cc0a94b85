"""The Cluster object: start attention and expert workers on Ray, wire them, run steps, stop.

``address="local"`` starts the embedded default (a local Ray instance whose node offers the
``attention`` and ``expert`` resources); ``"auto"`` or ``"ray://…"`` joins a running cluster
whose node types offer them (see cluster/ray-cluster.yaml and k8s/). Expert workers are placed
first, their ZMQ endpoints collected, then every attention worker is connected to all of them
through a versioned placement table. Per-layer traffic never goes through Ray.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.errors import ClusterStartError, WorkerFailure
from router.placement import PlacementTable
from workers.attention_worker import AttentionWorker
from workers.batch import SequenceChunk
from workers.checkpoint import Checkpoint
from workers.expert_worker import ExpertWorker
from workers.generate import GenerateResult, greedy_loop
from workers.kv_cache import BlockAllocator

log = logging.getLogger(__name__)

LOCAL_RAY_START_ATTEMPTS = 2  # a local Ray node that fails to start is started once more


@dataclass(frozen=True)
class ClusterConfig:
    checkpoint: str
    address: str = "local"
    num_attention_workers: int = 1
    num_expert_workers: int = 2
    expert_replicas: int = 1
    dtype: str = "float32"
    num_kv_blocks: int = 1024
    block_size_tokens: int = 16
    dispatch_timeout_s: float = 30.0
    step_timeout_s: float = 120.0  # an attention worker's answer to one step (longer than a dispatch)
    start_timeout_s: float = 180.0
    threads_per_worker: int = 1
    micro_batches: int = 1  # > 1: per attention-worker step, taking turns while the experts compute
    num_gpus_per_worker: float = 0.0
    bind_host: str | None = None  # None: 127.0.0.1 for the embedded default, the node's IP otherwise

    def __post_init__(self) -> None:
        checks = {
            "num_attention_workers": self.num_attention_workers >= 1,
            "num_expert_workers": self.num_expert_workers >= 1,
            "expert_replicas": 1 <= self.expert_replicas <= self.num_expert_workers,
            "dtype": self.dtype in ("float32", "bfloat16", "float16"),
            "num_kv_blocks": self.num_kv_blocks >= 1,
            "block_size_tokens": self.block_size_tokens >= 1,
            "dispatch_timeout_s": self.dispatch_timeout_s > 0,
            "start_timeout_s": self.start_timeout_s > 0,
            "threads_per_worker": self.threads_per_worker >= 1,
            "micro_batches": self.micro_batches >= 1,
            "num_gpus_per_worker": self.num_gpus_per_worker >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ClusterConfig.{name}={getattr(self, name)!r} is invalid")
        if not self.step_timeout_s > self.dispatch_timeout_s:  # so a hung expert worker is named, not its caller
            raise ValueError(f"ClusterConfig.step_timeout_s={self.step_timeout_s!r} must exceed "
                             f"dispatch_timeout_s={self.dispatch_timeout_s!r}")
        if not (self.address in ("local", "auto") or self.address.startswith("ray://")):
            raise ValueError(f"ClusterConfig.address={self.address!r}: use 'local', 'auto' or 'ray://host:port'")


def _wait_until_dead(actors: list, timeout_s: float = 10.0) -> None:
    """``ray.kill`` only asks: a call that reaches an actor before the kill still runs. Wait until
    every actor refuses calls, so nothing of the cluster serves after ``shutdown`` returns."""
    deadline = time.monotonic() + timeout_s
    for actor in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # RayActorError once it is gone (or a timeout: then it is not serving)
                break
            time.sleep(0.05)
        else:
            log.warning("a worker still answered %.0f s after it was killed", timeout_s)


def unwrap_ray_error(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    return f"{type(exc).__name__}: {exc}"


class Cluster:
    """A running set of attention and expert workers. Use ``Cluster.start(config)`` or ``with``."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.model_config = Checkpoint(config.checkpoint).config
        self.placement = PlacementTable.even(self.model_config.n_routed_experts, config.num_expert_workers,
                                             config.expert_replicas)
        self.attention: list[Any] = []
        self.experts: list[Any] = []
        self.worker_info: list[dict[str, Any]] = []
        self.endpoints: dict[int, str] = {}       # expert worker -> its dispatch endpoint
        self.step_endpoints: list[str] = []       # attention worker -> its step endpoint
        self.allocators = [BlockAllocator(config.num_kv_blocks) for _ in range(config.num_attention_workers)]
        self._owns_ray = False
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def start(cls, config: ClusterConfig) -> Cluster:
        cluster = cls(config)
        try:
            cluster._start()
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def _start(self) -> None:
        cfg = self.config
        self._connect_ray()
        checkpoint = str(Path(cfg.checkpoint).resolve())
        bind_host = cfg.bind_host or ("127.0.0.1" if cfg.address == "local" else None)

        def options(role: str, index: int) -> dict[str, Any]:
            return {"num_cpus": 0, "num_gpus": cfg.num_gpus_per_worker, "resources": {role: 1},
                    "max_restarts": 0, "name": f"moecluster-{role}-{index}-{os.getpid()}-{id(self)}"}

        device = "cuda" if cfg.num_gpus_per_worker > 0 else "cpu"
        expert_cls = ray.remote(ExpertWorker)
        for i in range(cfg.num_expert_workers):
            self.experts.append(expert_cls.options(**options("expert", i)).remote(
                checkpoint, i, self.placement.experts_of(i), cfg.dtype, bind_host, cfg.threads_per_worker, device))
        attention_cls = ray.remote(AttentionWorker)
        for i in range(cfg.num_attention_workers):
            self.attention.append(attention_cls.options(**options("attention", i)).remote(
                checkpoint, i, cfg.num_kv_blocks, cfg.block_size_tokens, cfg.dtype, cfg.threads_per_worker, device,
                cfg.micro_batches))
        expert_info = self._wait([a.ready.remote() for a in self.experts], "expert")
        attention_info = self._wait([a.ready.remote() for a in self.attention], "attention")
        self.worker_info = expert_info + attention_info
        self.endpoints = {info["index"]: info["endpoint"] for info in expert_info}
        self._wait([a.connect.remote(self.placement.to_dict(), self.endpoints, cfg.dispatch_timeout_s)
                    for a in self.attention], "attention")
        # Engine steps travel over ZMQ (workers.step_server); Ray calls stay for control.
        self.step_endpoints = self._wait([a.start_step_server.remote(bind_host) for a in self.attention], "attention")
        log.info("cluster up: %d attention, %d expert workers", len(self.attention), len(self.experts))

    def _connect_ray(self) -> None:
        cfg = self.config
        if ray.is_initialized():
            return
        attempts = LOCAL_RAY_START_ATTEMPTS if cfg.address == "local" else 1
        for attempt in range(1, attempts + 1):
            try:
                if cfg.address == "local":
                    # address="local" always starts a fresh instance, even if a Ray cluster runs on this host
                    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                             logging_level=logging.WARNING,
                             resources={"attention": cfg.num_attention_workers, "expert": cfg.num_expert_workers})
                    self._owns_ray = True
                else:
                    ray.init(address=cfg.address, logging_level=logging.WARNING)
                return
            except Exception as exc:  # Ray raises plain exceptions (ConnectionError, RuntimeError, ...)
                if attempt < attempts:
                    # A local node whose raylet or dashboard died while starting (seen now and then right
                    # after another Ray instance on this host stopped): clear what it left, start afresh.
                    log.warning("local Ray did not start (%s: %s); starting it again", type(exc).__name__, exc)
                    ray.shutdown()
                    continue
                what = ("start a local Ray instance" if cfg.address == "local"
                        else f"join the Ray cluster at {cfg.address}")
                raise ClusterStartError(f"could not {what}: {type(exc).__name__}: {exc}") from exc

    def _wait(self, refs: list[Any], role: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.config.start_timeout_s)
        except GetTimeoutError:
            available = ray.available_resources().get(role, 0)
            raise ClusterStartError(
                f"{role} workers not ready after {self.config.start_timeout_s:.0f} s; the Ray cluster offers "
                f"{available:g} free '{role}' resource(s) for {len(refs)} worker(s)") from None
        except (RayActorError, RayTaskError) as exc:
            raise ClusterStartError(f"{role} worker failed to start: {unwrap_ray_error(exc)}") from None

    def shutdown(self) -> None:
        """Stop every worker (closing its sockets), then Ray if this object started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        actors = self.attention + self.experts
        for actor in actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except Exception as exc:  # a dead worker has nothing left to close
                log.debug("worker shutdown: %s", unwrap_ray_error(exc))
        for actor in actors:
            ray.kill(actor, no_restart=True)
        _wait_until_dead(actors)
        self.attention, self.experts = [], []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- steps ----------------------------------------------------------------------------------
    def forward(self, worker: int, chunks: list[SequenceChunk]) -> torch.Tensor:
        """One step on attention worker ``worker``; logits [N, V] of the rows the chunks ask for."""
        try:
            return ray.get(self.attention[worker].forward.remote(chunks))
        except (RayActorError, RayTaskError) as exc:
            raise WorkerFailure(f"step failed on attention worker {worker}: {unwrap_ray_error(exc)}") from None

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: tuple[int, ...] = (),
                 keep_logits: bool = False) -> GenerateResult:
        """Greedy continuations; prompts are spread round-robin over the attention workers, which run
        concurrently and share the expert workers."""
        groups = [list(range(w, len(prompts), len(self.attention))) for w in range(len(self.attention))]

        def run(worker: int) -> GenerateResult:
            if not groups[worker]:
                return GenerateResult([], [])
            return greedy_loop(lambda chunks: self.forward(worker, chunks), self.allocators[worker],
                               [prompts[i] for i in groups[worker]], max_new_tokens, self.config.block_size_tokens,
                               stop_token_ids, keep_logits)

        with ThreadPoolExecutor(len(self.attention)) as pool:
            results = list(pool.map(run, range(len(self.attention))))
        tokens: list[list[int]] = [[] for _ in prompts]
        logits: list[list[torch.Tensor]] = [[] for _ in prompts]
        for group, result in zip(groups, results, strict=True):
            for j, i in enumerate(group):
                tokens[i] = result.token_ids[j]
                if keep_logits:
                    logits[i] = result.logits[j]
        return GenerateResult(tokens, logits)

    # ---- observation ----------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        return {"attention": ray.get([a.counters.remote() for a in self.attention]),
                "expert": ray.get([a.counters.remote() for a in self.experts])}
