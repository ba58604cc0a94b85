"""Traffic counters of the data plane, read by the load balancer and the metrics exporter.

`ServerCounters` live in an expert server (per layer: pairs per expert, bytes, dispatches);
`DispatcherCounters` live in a dispatcher (per layer and worker: bytes, dispatches, round trips).
One thread writes, any thread may call `snapshot()`, which returns plain lists and dicts with
string keys (msgpack- and JSON-able).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from router import wire


@dataclass
class _ServerLayer:
    dispatches: int = 0
    tokens: int = 0
    pairs: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0


class ServerCounters:
    """Per layer: dispatches served, token rows and (token, expert) pairs received, bytes each way.

    `tokens_per_expert` counts, per expert, the tokens routed to it (one per pair). The server
    counts a dispatch with `record_later` before it replies and `flush`es after the reply is
    sent, so the counting is not on the round trip; every reader flushes first, so a reply the
    caller has received is always counted.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._lock = threading.Lock()
        self._layers: dict[int, _ServerLayer] = {}
        self._tokens_per_expert: dict[int, np.ndarray] = {}
        self._later: tuple[int, torch.Tensor, int, Sequence[Any], Sequence[Any]] | None = None
        self.errors = 0

    def record_later(self, layer: int, pair_expert: torch.Tensor, tokens: int, frames_received: Sequence[Any],
                     frames_sent: Sequence[Any]) -> None:
        """Count one dispatch at the next `flush` (or read); bytes are the frames' sizes. `pair_expert`
        must hold ids in 0..num_experts-1 (the server checks them)."""
        with self._lock:
            self._flush_locked()
            self._later = (layer, pair_expert, tokens, frames_received, frames_sent)

    def flush(self) -> None:
        """Count the dispatch `record_later` holds, if any."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._later is not None:
            layer, pair_expert, tokens, frames_received, frames_sent = self._later
            self._later = None
            self._record_locked(layer, pair_expert, tokens, wire.nbytes(frames_received), wire.nbytes(frames_sent))

    def _record_locked(self, layer: int, pair_expert: torch.Tensor, tokens: int, bytes_received: int,
                       bytes_sent: int) -> None:
        counts = self._layers.get(layer)
        if counts is None:
            counts = self._layers[layer] = _ServerLayer()
            self._tokens_per_expert[layer] = np.zeros(self.num_experts, dtype=np.int64)
        counts.dispatches += 1
        counts.tokens += tokens
        counts.pairs += pair_expert.numel()
        counts.bytes_received += bytes_received
        counts.bytes_sent += bytes_sent
        # numpy's bincount: a fraction of the cost of a torch call at a few hundred pairs
        self._tokens_per_expert[layer] += np.bincount(pair_expert.numpy(), minlength=self.num_experts)

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def total_tokens(self) -> int:
        """Token rows received over every layer since start."""
        with self._lock:
            self._flush_locked()
            return sum(c.tokens for c in self._layers.values())

    def tokens_per_expert(self, layer: int) -> torch.Tensor:
        """Copy of the [num_experts] int64 pair counts of one layer (zeros if never dispatched)."""
        with self._lock:
            self._flush_locked()
            counts = self._tokens_per_expert.get(layer)
            if counts is None:
                return torch.zeros(self.num_experts, dtype=torch.int64)
            return torch.from_numpy(counts.copy())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._flush_locked()
            layers = [
                {"layer": layer, **asdict(c), "tokens_per_expert": self._tokens_per_expert[layer].tolist()}
                for layer, c in sorted(self._layers.items())
            ]
            return {"num_experts": self.num_experts, "errors": self.errors, "layers": layers}


@dataclass
class _Link:
    dispatches: int = 0
    tokens_sent: int = 0
    pairs_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rtt_s_sum: float = 0.0
    rtt_s_count: int = 0
    rtt_s_max: float = 0.0


class DispatcherCounters:
    """Per (layer, worker): dispatches, tokens and pairs sent, bytes each way, round-trip seconds.

    A round trip is timed from send to the moment the reply is read, so it includes any time the
    caller spent (e.g. on the shared expert) before calling `PendingDispatch.result()`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[tuple[int, int], _Link] = {}
        self.timeouts = 0
        self.remote_errors = 0
        self.stale_replies = 0

    def record_send(self, layer: int, worker: int, tokens: int, pairs: int, bytes_sent: int) -> None:
        with self._lock:
            link = self._links.setdefault((layer, worker), _Link())
            link.dispatches += 1
            link.tokens_sent += tokens
            link.pairs_sent += pairs
            link.bytes_sent += bytes_sent

    def record_reply(self, layer: int, worker: int, bytes_received: int, rtt_s: float) -> None:
        with self._lock:
            link = self._links.setdefault((layer, worker), _Link())
            link.bytes_received += bytes_received
            link.rtt_s_sum += rtt_s
            link.rtt_s_count += 1
            link.rtt_s_max = max(link.rtt_s_max, rtt_s)

    def record_timeout(self) -> None:
        with self._lock:
            self.timeouts += 1

    def record_remote_error(self) -> None:
        with self._lock:
            self.remote_errors += 1

    def record_stale_reply(self) -> None:
        with self._lock:
            self.stale_replies += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            links = [
                {"layer": layer, "worker": worker, **asdict(link)}
                for (layer, worker), link in sorted(self._links.items())
            ]
            return {
                "timeouts": self.timeouts,
                "remote_errors": self.remote_errors,
                "stale_replies": self.stale_replies,
                "links": links,
            }
