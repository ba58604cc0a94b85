"""Continuous batching: which tokens of which requests run on which attention worker each step.

Each step, per attention worker: decode tokens of running requests first, then the next prefill
chunk of requests still prefilling, then new requests from the waiting queue — until the
worker's token budget (``max_num_batched_tokens``) or sequence cap (``max_num_seqs``) is used.
Long prompts are prefilled in chunks. KV blocks are accounted per attention worker (the workers
own the tensors, the scheduler owns the block tables). When a worker runs out of blocks the
newest request on it is preempted: its blocks are freed and it goes back to the front of the
waiting queue to be recomputed later. New requests go to the worker with the most free blocks
(then the fewest running requests).

The engine may schedule a step while the previous one still computes (overlapped scheduling):
a request then decodes from a placeholder for its last token (``cluster.request``). A request
whose final token is already in flight is not scheduled again, and a preempted request whose
last token is still in flight is readmitted once that token is known.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from cluster.request import Request, RequestStatus
from workers.batch import SequenceChunk
from workers.kv_cache import BlockAllocator, NoFreeBlocks, blocks_needed
from workers.model_runner import RowSampling


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_waiting_requests: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_waiting_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name}={getattr(self, name)} must be >= 1")


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int
    samples: bool
    output_index: int = -1  # where the sampled token goes in request.output_ids (set when the step is sent)


@dataclass
class WorkerPlan:
    chunks: list[SequenceChunk] = field(default_factory=list)
    sampling: list[RowSampling] = field(default_factory=list)
    scheduled: list[ScheduledChunk] = field(default_factory=list)
    num_tokens: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_workers: int, num_kv_blocks: int,
                 block_size_tokens: int) -> None:
        self.config = config
        self.block_size_tokens = block_size_tokens
        self.allocators = [BlockAllocator(num_kv_blocks) for _ in range(num_workers)]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []      # in arrival order
        self.num_preemptions = 0

    # ---- queues ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def running_on(self, worker: int) -> list[Request]:
        return [r for r in self.running if r.worker == worker]

    def free_blocks(self, request: Request) -> None:
        if request.worker is not None and request.block_table:
            self.allocators[request.worker].free(request.block_table)
        request.block_table = []
        request.num_cached = 0
        request.worker = None

    def finish(self, request: Request) -> None:
        """Remove a request from the queues and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.free_blocks(request)
        request.status = RequestStatus.FINISHED

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.free_blocks(request)
        request.status = RequestStatus.WAITING
        request.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make the request's block table cover ``num_tokens`` tokens; False if blocks ran out."""
        missing = blocks_needed(num_tokens, self.block_size_tokens) - len(request.block_table)
        if missing <= 0:
            return True
        try:
            request.block_table.extend(self.allocators[request.worker].allocate(missing))
            return True
        except NoFreeBlocks:
            return False

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> dict[int, WorkerPlan]:
        plans = {w: WorkerPlan() for w in range(len(self.allocators))}
        budget = self.config.max_num_batched_tokens
        # 1. running requests, oldest first: decodes, then continuing prefills.
        for decoding in (True, False):
            for request in list(self.running):
                if request.status is not RequestStatus.RUNNING:
                    continue  # preempted earlier in this pass
                pending = request.num_tokens - request.num_cached
                if (pending == 1) != decoding or (decoding and request.last_token_scheduled):
                    continue
                plan = plans[request.worker]
                if len(plan.scheduled) >= self.config.max_num_seqs or plan.num_tokens >= budget:
                    continue
                self._schedule_running(request, plan, min(pending, budget - plan.num_tokens))
        # 2. waiting requests, in order, while some worker has room.
        while self.waiting:
            request = self.waiting[0]
            if request.num_unresolved:  # preempted while a step computes its token: readmit once it is known
                break
            worker = self._pick_worker(plans, request)
            if worker is None:
                break
            self.waiting.popleft()
            request.worker = worker
            request.status = RequestStatus.RUNNING
            # by arrival, so a readmitted (preempted) request keeps its age: the newest is the next victim
            bisect.insort(self.running, request, key=lambda r: r.arrival)
            plan = plans[worker]
            self._schedule_running(request, plan, min(request.num_tokens, budget - plan.num_tokens))
        return {w: p for w, p in plans.items() if p.scheduled}

    def _schedule_running(self, request: Request, plan: WorkerPlan, num_tokens: int) -> None:
        end = request.num_cached + num_tokens
        while not self._grow(request, end):
            victim = next(r for r in reversed(self.running) if r.worker == request.worker
                          and r.status is RequestStatus.RUNNING)
            self._unschedule(plan, victim)
            self._preempt(victim)
            if victim is request:
                return
        samples = end == request.num_tokens
        plan.chunks.append(SequenceChunk(request.token_ids(request.num_cached, end), request.num_cached,
                                         list(request.block_table), num_logits=int(samples)))
        if samples:
            penalties = request.params.has_penalties
            plan.sampling.append(RowSampling(
                request.params, len(request.output_ids),
                tuple(request.prompt_ids) if penalties else (), tuple(request.output_ids) if penalties else ()))
        plan.scheduled.append(ScheduledChunk(request, num_tokens, samples))
        plan.num_tokens += num_tokens

    @staticmethod
    def _unschedule(plan: WorkerPlan, request: Request) -> None:
        """Take a request back out of this step's plan (it is being preempted)."""
        for i, entry in enumerate(plan.scheduled):
            if entry.request is request:
                sample_row = sum(e.samples for e in plan.scheduled[:i])
                del plan.scheduled[i], plan.chunks[i]
                if entry.samples:
                    del plan.sampling[sample_row]
                plan.num_tokens -= entry.num_tokens
                return

    def _pick_worker(self, plans: dict[int, WorkerPlan], request: Request) -> int | None:
        """The worker with the most free blocks (then fewest running) that has room for a first chunk."""
        best: tuple[int, int, int] | None = None
        for worker, plan in plans.items():
            room = self.config.max_num_batched_tokens - plan.num_tokens
            if room <= 0 or len(plan.scheduled) >= self.config.max_num_seqs:
                continue
            first_chunk = min(request.num_tokens, room)
            if blocks_needed(first_chunk, self.block_size_tokens) > self.allocators[worker].num_free:
                continue
            key = (self.allocators[worker].num_free, -len(self.running_on(worker)), -worker)
            if best is None or key > best:
                best = key
        return None if best is None else -best[2]

    def kv_usage(self) -> list[dict[str, int]]:
        return [{"worker": w, "num_blocks": a.num_blocks, "free_blocks": a.num_free}
                for w, a in enumerate(self.allocators)]
