"""Placement table: which expert workers hold a replica of each routed expert.

The dispatcher reads it to pick a destination worker for every (token, expert) pair; the load
balancer will rebuild it from observed load and bump `version`. It travels as a msgpack-able dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from router.errors import PlacementError


@dataclass(frozen=True)
class PlacementTable:
    """Expert id -> worker ids holding a replica (the first one is the primary).

    `replicas[e]` lists the workers of expert `e`; worker ids are `0 .. num_workers - 1`.
    """

    num_workers: int
    replicas: tuple[tuple[int, ...], ...]
    version: int = 0
    # Dense lookup for `choose`: [num_experts, max replicas] padded by repeating, and counts.
    _table: torch.Tensor = field(init=False, repr=False, compare=False)
    _counts: torch.Tensor = field(init=False, repr=False, compare=False)
    # With one replica per expert, `pair_workers`' numpy lookup: expert -> its worker (else None).
    _worker_of_expert: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        replicas = tuple(tuple(int(w) for w in ws) for ws in self.replicas)
        object.__setattr__(self, "replicas", replicas)
        if self.num_workers < 1:
            raise PlacementError(f"num_workers must be >= 1, got {self.num_workers}")
        if not replicas:
            raise PlacementError("placement has no experts")
        if self.version < 0:
            raise PlacementError(f"version must be >= 0, got {self.version}")
        for expert, workers in enumerate(replicas):
            if not workers:
                raise PlacementError(f"expert {expert} has no replica")
            bad = [w for w in workers if not 0 <= w < self.num_workers]
            if bad:
                raise PlacementError(f"expert {expert} is placed on worker(s) {bad}, outside 0..{self.num_workers - 1}")
            if len(set(workers)) != len(workers):
                raise PlacementError(f"expert {expert} lists a worker twice: {list(workers)}")
        width = max(len(ws) for ws in replicas)
        table = torch.tensor([[ws[i % len(ws)] for i in range(width)] for ws in replicas], dtype=torch.int64)
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_counts", torch.tensor([len(ws) for ws in replicas], dtype=torch.int64))
        object.__setattr__(self, "_worker_of_expert", table[:, 0].numpy() if width == 1 else None)

    @classmethod
    def even(cls, num_experts: int, num_workers: int, replicas: int = 1) -> PlacementTable:
        """Contiguous blocks of experts per worker; extra replicas go to the following workers."""
        if num_experts < 1 or num_workers < 1:
            raise PlacementError(f"need num_experts >= 1 and num_workers >= 1, got {num_experts}, {num_workers}")
        if not 1 <= replicas <= num_workers:
            raise PlacementError(f"replicas must be in 1..num_workers ({num_workers}), got {replicas}")
        primary = [e * num_workers // num_experts for e in range(num_experts)]
        return cls(
            num_workers=num_workers,
            replicas=tuple(tuple((p + r) % num_workers for r in range(replicas)) for p in primary),
        )

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    def workers_of(self, expert: int) -> list[int]:
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"expert {expert} outside 0..{self.num_experts - 1}")
        return list(self.replicas[expert])

    def experts_of(self, worker: int) -> list[int]:
        if not 0 <= worker < self.num_workers:
            raise PlacementError(f"worker {worker} outside 0..{self.num_workers - 1}")
        return [e for e, ws in enumerate(self.replicas) if worker in ws]

    def choose(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Destination worker per (token, k), same shape as `topk_ids` [T, K], int64.

        With several replicas, token t goes to replica `t % replica_count`: deterministic, and it
        spreads a hot expert's tokens over its copies.
        """
        ids = topk_ids.to(device="cpu", dtype=torch.int64)
        if ids.dim() != 2:
            raise PlacementError(f"topk_ids must be [T, K], got shape {list(ids.shape)}")
        try:  # index_select bounds-checks the ids, negative ones included
            if self._table.shape[1] == 1:  # one replica each: a plain lookup
                return self._table.view(-1).index_select(0, ids.reshape(-1)).view(ids.shape)
            counts = self._counts.index_select(0, ids.reshape(-1)).view(ids.shape)
        except IndexError:
            raise PlacementError(f"topk_ids outside 0..{self.num_experts - 1}") from None
        token = torch.arange(ids.shape[0], dtype=torch.int64).unsqueeze(1)
        return self._table[ids, token % counts]

    def replica_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(table int64 [E, R], counts int64 [E]): expert e's replicas are ``table[e, :counts[e]]``;
        ``choose`` sends token t of expert e to ``table[e, t % counts[e]]``. Shared: do not modify."""
        return self._table, self._counts

    def pair_workers(self, topk_ids: torch.Tensor) -> np.ndarray:
        """``choose`` flattened token-major, as int64 numpy: the dispatcher's per-layer form.

        ``topk_ids`` [T, K] must be int64 on the CPU. With one replica per expert this is a numpy
        lookup, a fraction of torch's per-call cost for a few hundred ids.
        """
        if self._worker_of_expert is None:  # replicas: choose spreads tokens over them
            return self.choose(topk_ids).numpy().reshape(-1)
        expert = topk_ids.numpy().reshape(-1)
        # One reduction bounds the ids: as uint64 a negative int64 is above any expert count.
        if expert.size and expert.view(np.uint64).max() >= self.num_experts:
            raise PlacementError(f"topk_ids outside 0..{self.num_experts - 1}")
        return self._worker_of_expert[expert]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "num_workers": self.num_workers,
            "replicas": [list(ws) for ws in self.replicas],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlacementTable:
        missing = [k for k in ("version", "num_workers", "replicas") if k not in data]
        if missing:
            raise PlacementError(f"placement dict lacks field(s) {missing}")
        return cls(
            num_workers=data["num_workers"], replicas=tuple(map(tuple, data["replicas"])), version=data["version"]
        )
