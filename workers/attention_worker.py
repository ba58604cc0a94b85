"""AttentionWorker: a Ray actor holding everything of the model but the routed experts.

Embeddings, attention layers with their paged KV cache, dense MLPs, each MoE layer's gate and
shared expert, the final norm, the LM head and the MTP layer's non-expert parts. Its MoE blocks
use the router's Dispatcher as expert backend, so routed tokens go to the expert workers over
ZMQ while the shared expert runs. The coordinator drives it one step at a time and owns the
block accounting; the worker owns the KV tensors.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from router.dispatcher import Dispatcher
from router.placement import PlacementTable
from workers import cpu_kernels
from workers.batch import SequenceChunk
from workers.checkpoint import Checkpoint
from workers.kv_cache import PagedKVCache
from workers.malloc_tuning import tune_malloc
from workers.model import Glm4MoeForCausalLM
from workers.model_runner import ModelRunner, RowSampling, StepOutput
from workers.placement_info import node_identity
from workers.step_server import StepServer


class AttentionWorker:
    def __init__(self, checkpoint_dir: str, worker_index: int, num_kv_blocks: int, block_size_tokens: int,
                 dtype: str = "float32", num_threads: int = 1, device: str = "cpu", micro_batches: int = 1) -> None:
        tune_malloc()
        torch.set_num_threads(num_threads)
        self.worker_index = worker_index
        self.device = torch.device(device)
        checkpoint = Checkpoint(checkpoint_dir)
        self.config = checkpoint.config
        tensors = checkpoint.load(Glm4MoeForCausalLM.owns_tensor(self.config), getattr(torch, dtype))
        self._tensor_names = sorted(tensors)
        self.model = Glm4MoeForCausalLM.from_tensors(self.config, tensors, self.device)
        self.kv = PagedKVCache(self.config, num_kv_blocks, block_size_tokens, dtype=getattr(torch, dtype),
                               device=self.device)
        self.runner = ModelRunner(self.model, self.kv, micro_batches)
        self.dispatcher: Dispatcher | None = None
        self.step_server: StepServer | None = None
        self._step_lock = threading.Lock()  # steps come from Ray calls or the step channel, one at a time

    def ready(self) -> dict[str, Any]:
        return {"role": "attention", "index": self.worker_index, "pid": os.getpid(),
                "num_kv_blocks": self.kv.num_blocks, **node_identity()}

    def connect(self, placement: dict[str, Any], endpoints: dict[int, str], timeout_s: float) -> None:
        """(Re)wire the MoE layers to the expert workers of ``placement``."""
        if self.dispatcher is not None:
            self.dispatcher.close()
        # messages leave from and replies arrive in host memory whatever the device: the C++
        # kernels plan and sum them there
        self.dispatcher = Dispatcher(PlacementTable.from_dict(placement), endpoints, timeout_s=timeout_s,
                                     kernels=cpu_kernels.dispatch_kernels())
        self.model.set_expert_backend(self.dispatcher)

    def start_step_server(self, bind_host: str | None = None) -> str:
        """Serve engine steps over ZMQ (``workers.step_server``); returns the endpoint to connect to."""
        if self.step_server is None:
            host = bind_host or node_identity()["node_ip"]
            self.step_server = StepServer(self.execute, bind_host=host).start()
        return self.step_server.endpoint

    def forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """One flat step; returns the logits [N, V] of the rows the chunks ask for (on the CPU)."""
        with self._step_lock:
            return self.runner.logits(chunks).cpu()

    def execute(self, chunks: list[SequenceChunk], sampling: list[RowSampling]) -> StepOutput:
        """One engine step: forward, then sample on this worker (only token ids travel back)."""
        with self._step_lock:
            return self.runner.execute(chunks, sampling)

    def tensor_names(self) -> list[str]:
        return self._tensor_names

    def counters(self) -> dict[str, Any]:
        return self.dispatcher.counters.snapshot() if self.dispatcher else {}

    def shutdown(self) -> None:
        if self.step_server is not None:
            self.step_server.stop()
            self.step_server = None
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None
