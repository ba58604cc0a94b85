"""The coordinator's engine: admission, the step loop, stop conditions and streaming.

``submit`` validates a request, queues it (a bounded queue: beyond it, ``EngineOverloaded``)
and returns an async iterator of ``RequestOutput``. The engine loop runs on the caller's
asyncio loop: it schedules a step (cluster.scheduler), sends it to the attention workers, waits
for it without blocking the event loop (which keeps serving clients), then appends each sampled token,
detokenizes incrementally, applies stop conditions and pushes outputs to the streams. It sleeps
when idle. Abort at any time frees the request's KV blocks (after the steps in flight, if any).

Overlapped scheduling (``EngineConfig.async_scheduling``, on by default, as vLLM's
``--async-scheduling``): the engine schedules and sends step N+1 before step N's tokens are back,
so an attention worker finds its next step waiting when it finishes one instead of idling while
the coordinator collects, schedules and sends. Step N+1 names the tokens N is sampling by
placeholders (``cluster.request``) that the worker fills in. The cost: a request that stops on a
stop token or string has already been given one more row, whose token is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cluster.errors import ClusterError
from cluster.executor import ClusterExecutor, LocalExecutor, StepExecutor
from cluster.request import Request, RequestOutput, RequestStatus
from cluster.runtime import Cluster, ClusterConfig
from cluster.scheduler import Scheduler, SchedulerConfig, WorkerPlan
from cluster.stop_checker import StopChecker
from cluster.tokenizer import IncrementalDetokenizer, Tokenizer
from workers.kv_cache import blocks_needed
from workers.model_runner import StepOutput
from workers.sampling import InvalidSamplingParams, SamplingParams

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request the engine cannot serve; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the client should retry later."""


class EngineUnavailable(RuntimeError):
    """The engine is not running (starting, stopped, or lost workers it cannot replace)."""


@dataclass(frozen=True)
class EngineConfig:
    checkpoint: str
    address: str = "local"
    num_attention_workers: int = 1
    num_expert_workers: int = 2
    expert_replicas: int = 1
    dtype: str = "float32"
    num_kv_blocks: int = 1024
    block_size_tokens: int = 16
    dispatch_timeout_s: float = 30.0
    step_timeout_s: float = 120.0
    start_timeout_s: float = 180.0
    threads_per_worker: int = 1
    micro_batches: int = 1
    num_gpus_per_worker: float = 0.0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_waiting_requests: int = 1024
    async_scheduling: bool = True
    model_name: str | None = None

    def cluster_config(self) -> ClusterConfig:
        names = {f.name for f in fields(ClusterConfig)}
        return ClusterConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in names})

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.max_waiting_requests)


@dataclass
class LaunchedStep:
    """A step sent to the attention workers whose outputs are still to collect."""

    plans: dict[int, WorkerPlan]
    handle: Any  # what executor.launch returned


class Engine:
    def __init__(self, executor: StepExecutor, tokenizer: Tokenizer, scheduler_config: SchedulerConfig,
                 model_name: str = "glm4_moe", async_scheduling: bool = True) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.model_config = executor.model_config
        self.model_name = model_name
        self.scheduler = Scheduler(scheduler_config, executor.num_workers, executor.num_kv_blocks,
                                   executor.block_size_tokens)
        self.eos_token_ids = frozenset(self.model_config.eos_token_id) | frozenset(tokenizer.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._launched: deque[LaunchedStep] = deque()  # sent, oldest first; at most max_steps_in_flight
        self.max_steps_in_flight = 2 if async_scheduling else 1
        self._unavailable: str | None = None
        self.num_steps = 0

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, config: EngineConfig) -> Engine:
        """An engine over a Ray cluster of attention and expert workers (blocks while it starts)."""
        cluster = Cluster.start(config.cluster_config())
        try:
            return cls(ClusterExecutor(cluster), Tokenizer.from_folder(config.checkpoint),
                       config.scheduler_config(), config.model_name or _default_name(config.checkpoint),
                       config.async_scheduling)
        except BaseException:
            cluster.shutdown()
            raise

    @classmethod
    def create_local(cls, config: EngineConfig) -> Engine:
        """A single-process engine (no Ray): the same coordinator over the in-process model."""
        executor = LocalExecutor(config.checkpoint, config.num_kv_blocks, config.block_size_tokens, config.dtype)
        return cls(executor, Tokenizer.from_folder(config.checkpoint), config.scheduler_config(),
                   config.model_name or _default_name(config.checkpoint), config.async_scheduling)

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done() and self._unavailable is None

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._wake = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="moecluster-engine")

    async def stop(self) -> None:
        """Abort every request and stop the workers."""
        for request in list(self._requests.values()):
            self.abort(request.request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._unavailable = "engine stopped"
        await asyncio.to_thread(self.executor.shutdown)

    # ---- requests -------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        context = self.model_config.max_position_embeddings
        if not prompt_ids:
            raise InvalidRequest("prompt", "is empty")
        if len(prompt_ids) >= context:
            raise InvalidRequest("prompt", f"has {len(prompt_ids)} tokens; the context holds {context}")
        bad = [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequest("prompt", f"token ids {bad[:5]} outside [0, {self.model_config.vocab_size})")
        try:
            params.validate(context)
        except InvalidSamplingParams as exc:
            raise InvalidRequest(exc.field, str(exc)) from None
        if len(prompt_ids) + params.max_new_tokens > context:
            raise InvalidRequest("max_new_tokens", f"prompt ({len(prompt_ids)}) + max_new_tokens "
                                 f"({params.max_new_tokens}) exceeds the context ({context})")
        worst_blocks = blocks_needed(len(prompt_ids) + params.max_new_tokens, self.scheduler.block_size_tokens)
        if worst_blocks > self.executor.num_kv_blocks:
            raise InvalidRequest("max_new_tokens", f"prompt + max_new_tokens needs {worst_blocks} KV blocks; "
                                 f"an attention worker has {self.executor.num_kv_blocks}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate and queue a request; its outputs arrive on ``request.stream``."""
        if not self.ready:
            raise EngineUnavailable(self._unavailable or "engine is not started")
        self.validate(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.scheduler.config.max_waiting_requests:
            raise EngineOverloaded(f"{len(self.scheduler.waiting)} requests already waiting "
                                   f"(max_waiting_requests={self.scheduler.config.max_waiting_requests})")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        request = Request(
            request_id=request_id, prompt_ids=list(prompt_ids), params=params, arrival=next(self._arrivals),
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            stop_checker=StopChecker(params.stop, params.include_stop_str_in_output),
            stop_token_ids=stop_ids, max_total_tokens=self.model_config.max_position_embeddings)
        self._requests[request_id] = request
        self.scheduler.add(request)
        assert self._wake is not None
        self._wake.set()
        return request

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and stream its outputs; closing the iterator early aborts the request.

        Validation and admission happen here, so bad input and a full queue raise at once."""
        request = self.add_request(prompt_ids, params, request_id)
        return self._stream(request)

    async def _stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                output = await request.stream.get()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            if not request.finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Finish a request now with reason "abort"; its KV blocks are freed at once (or right after
        the step in flight)."""
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return
        request.aborted = True
        if not self._in_a_launched_step(request):
            self._finish(request, "abort")

    def _in_a_launched_step(self, request: Request) -> bool:
        return any(entry.request is request for step in self._launched for plan in step.plans.values()
                   for entry in plan.scheduled)

    # ---- the loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        # Tokens sampled in a collected step whose text is yet to be made and streamed: done while
        # the next step runs (async output processing), since the schedule needs only the token ids.
        deferred: list[tuple[Request, StepOutput, int, int]] = []
        in_flight = self._launched
        while True:
            if not in_flight and not self.scheduler.has_work():
                self._emit_all(deferred)
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(in_flight) < self.max_steps_in_flight and self.scheduler.has_work():
                plans = self.scheduler.schedule()
                if plans:
                    try:
                        # Sent from this thread, so the workers start at once (a thread sending the
                        # step would wait for the GIL).
                        in_flight.append(self._launch(plans))
                    except ClusterError as exc:
                        self._emit_all(deferred)
                        await self._step_failed(exc, [*in_flight, LaunchedStep(plans, None)])
                        in_flight.clear()
                        continue
                    if len(in_flight) < self.max_steps_in_flight:
                        continue  # send the next step too before waiting for this one
            # The collected step's tokens stream while the steps just sent compute.
            self._emit_all(deferred)
            if not in_flight:  # work is queued, but nothing fits yet
                await asyncio.sleep(0.001)
                continue
            step = in_flight[0]  # stays in flight (an abort waits for it) until collected
            try:
                outputs = await self.executor.collect_async(step.handle)
            except ClusterError as exc:
                await self._step_failed(exc, list(in_flight))
                in_flight.clear()
                continue
            in_flight.popleft()
            self.num_steps += 1
            for worker, plan in step.plans.items():
                deferred += self._apply(plan, outputs[worker])

    def _launch(self, plans: dict[int, WorkerPlan]) -> LaunchedStep:
        """Send a step and advance its requests as if it had run: their tokens count as cached, and
        each sampling row gets a placeholder output token (``cluster.request``) until its token is back."""
        handle = self.executor.launch({w: (p.chunks, p.sampling) for w, p in plans.items()})
        for plan in plans.values():
            row = 0
            for entry in plan.scheduled:
                request = entry.request
                request.num_cached += entry.num_tokens
                if entry.samples:
                    entry.output_index = len(request.output_ids)
                    request.output_ids.append(-(row + 1))
                    request.num_unresolved += 1
                    row += 1
        return LaunchedStep(plans, handle)

    async def _step_failed(self, exc: ClusterError, steps: list[LaunchedStep]) -> None:
        """A step failed: end the requests of every step in flight with the error (the later ones
        ran, if at all, after the failed one) rather than hang or retry blindly."""
        log.error("step failed: %s", exc)
        lost = await asyncio.to_thread(self.executor.lost_workers)
        if lost:  # no replacement yet: stop taking requests rather than fail each one slowly
            self._unavailable = "lost workers: " + "; ".join(lost)
            log.error("engine unavailable: %s", self._unavailable)
            for request in list(self._requests.values()):
                self._finish(request, "abort", error=f"{exc}; {self._unavailable}")
            return
        for step in steps:
            for plan in step.plans.values():
                for entry in plan.scheduled:
                    if not entry.request.finished:
                        self._finish(entry.request, "abort", error=str(exc))

    def _apply(self, plan: WorkerPlan, output: StepOutput) -> list[tuple[Request, StepOutput, int, int]]:
        """Put the step's sampled tokens in place of their placeholders, and return those still to
        stream. A token that ends its request (a stop token id, a length limit) is streamed at once,
        so the request is never scheduled again; the rest wait for ``_emit_all``. A request
        preempted after the step was sent still gets its token (it is recomputed with it later)."""
        deferred = []
        row = 0
        for entry in plan.scheduled:
            request = entry.request
            if not entry.samples:
                if request.aborted and not request.finished:
                    self._finish(request, "abort")
                continue
            if request.finished:
                row += 1
                continue
            token = output.token_ids[row]
            request.output_ids[entry.output_index] = token
            request.num_unresolved -= 1
            if request.aborted:
                self._finish(request, "abort")
            elif token in request.stop_token_ids or request.is_last_output(entry.output_index + 1):
                self._emit(request, output, row, entry.output_index + 1)
            else:
                deferred.append((request, output, row, entry.output_index + 1))
            row += 1
        return deferred

    def _emit_all(self, deferred: list[tuple[Request, StepOutput, int, int]]) -> None:
        for request, output, row, produced in deferred:
            if request.status is not RequestStatus.FINISHED:  # not aborted or stopped meanwhile
                self._emit(request, output, row, produced)
        deferred.clear()

    def _emit(self, request: Request, output: StepOutput, row: int, produced: int) -> None:
        """Detokenize a sampled token (output token number ``produced``, already in
        ``request.output_ids``), apply the stop strings, token ids and length limits, and stream
        the update."""
        token = output.token_ids[row]
        text_delta = request.detokenizer.step([token])
        request.text += text_delta
        check = request.stop_checker.check(request.text, len(text_delta))
        finish = None
        if check.stopped:
            request.text = request.text[:check.truncate_to]
            finish = "stop"
        elif token in request.stop_token_ids:
            finish = "stop"
        elif request.is_last_output(produced):
            finish = "length"
        if finish is not None and not check.stopped:
            request.text += request.detokenizer.flush()
        visible = len(request.text) if finish else len(request.text) - check.hold_back_chars
        delta = request.text[request.sent_chars:visible]
        request.sent_chars = max(request.sent_chars, visible)
        logprobs = None if request.params.logprobs is None else [output.logprobs[row]]
        top = None if request.params.logprobs is None else [output.top_logprobs[row] or []]
        request.stream.put_nowait(RequestOutput(
            request.request_id, [token], delta, logprobs, top, finish, len(request.prompt_ids), produced))
        if finish is not None:
            self._finish(request, finish, notify=False)

    def _finish(self, request: Request, reason: str, notify: bool = True, error: str | None = None) -> None:
        # Blocks may go back while a later step still writes the request's K/V into them: each worker
        # runs its steps in order, so a new owner's step writes its own K/V over them first.
        self.scheduler.finish(request)
        if request.num_unresolved:  # tokens of steps in flight, dropped
            del request.output_ids[-request.num_unresolved:]
            request.num_unresolved = 0
        request.finish_reason = reason
        self._requests.pop(request.request_id, None)
        if notify:
            request.stream.put_nowait(RequestOutput(
                request.request_id, [], "", None, None, reason, len(request.prompt_ids),
                len(request.output_ids), error))

    # ---- observation ------------------------------------------------------------------------------
    def kv_blocks_in_use(self) -> int:
        return sum(a.num_blocks - a.num_free for a in self.scheduler.allocators)

    def status(self) -> dict[str, Any]:
        running = self.scheduler.running
        workers = []
        for info in self.executor.workers():
            if info["role"].startswith("attention"):
                info = info | {"load": len([r for r in running if r.worker == info["index"]])}
            workers.append(info)
        return {
            "model": self.model_name,
            "ready": self.ready,
            "workers": workers,
            "placement": self.executor.placement(),
            "kv": self.scheduler.kv_usage(),
            "queue": {"waiting": len(self.scheduler.waiting), "running": len(running)},
            "steps": self.num_steps,
            "preemptions": self.scheduler.num_preemptions,
        }


def _default_name(checkpoint: str) -> str:
    return Path(checkpoint).resolve().name
