"""ExpertWorker: a Ray actor holding a shard of the routed experts of every MoE layer.

It reads only its experts' tensors from the checkpoint (the MTP layer's too) and serves
dispatches from every attention worker over ZMQ (router.expert_server), computing the experts
grouped by expert, weighting, and summing per token before replying.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from router.expert_server import ExpertServer
from workers import cpu_kernels
from workers.checkpoint import Checkpoint
from workers.experts import ExpertShard, expert_predicate
from workers.malloc_tuning import tune_malloc
from workers.placement_info import node_identity


class ExpertWorker:
    def __init__(self, checkpoint_dir: str, worker_index: int, expert_ids: list[int], dtype: str = "float32",
                 bind_host: str | None = None, num_threads: int = 1, device: str = "cpu") -> None:
        tune_malloc()
        torch.set_num_threads(num_threads)
        self.worker_index = worker_index
        checkpoint = Checkpoint(checkpoint_dir)
        self.config = checkpoint.config
        tensors = checkpoint.load(expert_predicate(self.config, expert_ids), getattr(torch, dtype))
        self.shard = ExpertShard.from_tensors(self.config, expert_ids, tensors).to(device)
        self.bytes_read = checkpoint.bytes_read
        host = bind_host or node_identity()["node_ip"]  # on a cluster: this node's address
        self._load_mark = (time.monotonic(), 0)
        self.device = torch.device(device)
        self.server = ExpertServer(self._compute, self.config.n_routed_experts, bind_host=host,
                                   decode_dispatch=cpu_kernels.decode_dispatch()).start()

    def _compute(self, layer: int, x: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor,
                 pair_weight: torch.Tensor) -> torch.Tensor:
        """The server's compute: frames arrive and leave in host memory, the experts may sit on a GPU.

        On the CPU they are used as they are.
        """
        dev = self.device
        if dev.type == "cpu":  # five torch calls fewer on every dispatch
            return self.shard.compute(layer, x, pair_token, pair_expert, pair_weight)
        return self.shard.compute(layer, x.to(dev), pair_token.to(dev), pair_expert.to(dev),
                                  pair_weight.to(dev)).cpu()

    def ready(self) -> dict[str, Any]:
        """Identity of this worker once loaded: role, index, node, pid, endpoint, experts."""
        return {"role": "expert", "index": self.worker_index, "endpoint": self.server.endpoint,
                "experts": self.shard.expert_ids, "pid": os.getpid(), "bytes_read": self.bytes_read,
                **node_identity()}

    def load(self) -> float:
        """Token rows served per second (all MoE layers) since the previous call at least 1 s ago.

        The first call measures from the worker's start; ``GetClusterStatus`` reports it.
        """
        now, total = time.monotonic(), self.server.counters.total_tokens()
        since, before = self._load_mark
        rate = (total - before) / max(now - since, 1e-6)
        if now - since >= 1.0:
            self._load_mark = (now, total)
        return rate

    def endpoint(self) -> str:
        return self.server.endpoint

    def tensor_names(self) -> list[str]:
        return self.shard.tensor_names()

    def counters(self) -> dict[str, Any]:
        return self.server.counters.snapshot()

    def tokens_per_expert(self, layer: int) -> list[int]:
        return self.server.counters.tokens_per_expert(layer).tolist()

    def shutdown(self) -> None:
        self.server.stop()
