"""Serving benchmark: the cluster engine, the single-process engine and a transformers baseline.

A load generator in the manner of vLLM's ``benchmark_serving``: per concurrency, N requests (by
default at least 64 and eight times the concurrency, so a run holds several waves of requests
in flight rather than mostly its start and its tail; the same seeded list, cut to N) with seeded random
prompt lengths (token ids drawn uniformly from the tiny model's ordinary tokens) and random output
lengths, greedy with ``ignore_eos=True`` so every request produces exactly its output length. The
requests are sent at a fixed concurrency (a client keeps that many in flight; all are ready at
t=0), or with ``--request-rate`` at Poisson arrivals (the concurrency then caps requests in
flight). The same requests go, in the same run, to:

1. ``cluster``: ``Engine.create`` on the embedded default (local Ray, 1 attention worker and
   2 expert workers unless ``--attention-workers``/``--expert-workers`` say otherwise,
   ``threads_per_worker`` torch threads each) over the tiny "air" checkpoint;
2. ``local``: ``Engine.create_local``, the same coordinator over the in-process model;
3. ``hf-static``: Hugging Face transformers ``generate`` (greedy) on the same checkpoint with
   static batches: ``concurrency`` requests at a time in arrival order, left-padded with an
   attention mask, each batch generating the batch's longest output (``min_new_tokens`` equal to
   ``max_new_tokens`` so EOS cannot stop it early). Only a request's own output tokens count.

Per request: TTFT is the time from sending (for a static batch: from the batch's start; with
``--request-rate``: from arrival) to its first token; TPOT is (last token - first token) /
(output tokens - 1). The static-batch step times come from a ``StoppingCriteria`` that timestamps
every generation step. Output tokens/s and requests/s are over the wall time from the first
send to the last token. All three stay up for the whole run and, per concurrency, run back to back
on the same requests, after a warm-up of each; the coordinator process (``local`` and
``hf-static``) runs with ``--threads`` torch threads. The machine may be shared: per run the CPU
time of our processes (this one and the cluster's workers) and of everything else (Ray's own
daemons included) is read from /proc and reported in cores.

For the engines the coordinator's steps are timed from outside: the wall time while some step is
in flight (from ``executor.launch`` to the end of its ``executor.collect_async``; with overlapped
scheduling the next step is sent before the last is collected, so these spans join up), and the
time left over is the coordinator's own on the critical path (scheduling and the hand-offs while
no step runs); for the cluster the dispatcher's round-trip counters show what a step pays for
being distributed.

    .venv/bin/python benchmarks/serve.py [--quick] [--write-docs]

With --write-docs the "Serving" section of docs/benchmarks.md is replaced by this run's tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cluster.engine import Engine, EngineConfig  # noqa: E402
from workers.malloc_tuning import tune_malloc  # noqa: E402
from workers.sampling import SamplingParams  # noqa: E402
from workers.tiny import make_tiny, tiny_config  # noqa: E402
from workers.tiny_tokenizer import special_token_ids  # noqa: E402

DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_HEADING = "## Serving (benchmarks/serve.py)"


# The embedded default's cluster shape, as `moecluster serve` starts it.
DEFAULT_SHAPE = (EngineConfig.num_attention_workers, EngineConfig.num_expert_workers)


def section_heading(preset: str, attention_workers: int = DEFAULT_SHAPE[0],
                    expert_workers: int = DEFAULT_SHAPE[1]) -> str:
    """The embedded default ("air" preset, the default cluster shape) has the main section; other
    presets and cluster shapes get their own."""
    if preset == "air" and (attention_workers, expert_workers) == DEFAULT_SHAPE:
        return SECTION_HEADING
    names, flags = [], []
    if preset != "air":
        names.append(f"{preset} preset")
        flags.append(f"--preset {preset}")
    if (attention_workers, expert_workers) != DEFAULT_SHAPE:
        plural = "s" if expert_workers > 1 else ""
        names.append(f"{attention_workers} attention + {expert_workers} expert worker{plural}")
        flags.append(f"--attention-workers {attention_workers} --expert-workers {expert_workers}")
    return f"## Serving, {', '.join(names)} (benchmarks/serve.py {' '.join(flags)})"


DOCS_INTRO = "# Benchmarks\n\nResults of the programs in `benchmarks/`, each next to the command that produced it.\n"
ENGINES = ("cluster", "local", "hf-static")
# Requests per concurrency by default: at least MIN_REQUESTS, and WAVES times the concurrency, so a
# run is mostly steady state; with only twice the concurrency it is mostly its start and its tail.
MIN_REQUESTS = 64
WAVES = 8


# ---- workload -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_ids: list[int]
    output_len: int
    arrival_s: float  # offset from the start of the run; 0 for every request in concurrency mode


def make_requests(num: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                  seed: int, request_rate: float | None) -> list[BenchRequest]:
    rng = random.Random(seed)
    ordinary = min(special_token_ids(vocab_size).values())  # special tokens sit at the top of the vocab
    requests, arrival_s = [], 0.0
    for i in range(num):
        length = rng.randint(*prompt_len)
        if request_rate is not None and i > 0:
            arrival_s += rng.expovariate(request_rate)
        requests.append(BenchRequest(i, [rng.randrange(ordinary) for _ in range(length)],
                                     rng.randint(*output_len), arrival_s))
    return requests


# ---- measurements ---------------------------------------------------------------------------------
@dataclass
class RequestTiming:
    sent_s: float
    token_times_s: list[float]

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        n = len(self.token_times_s)
        return None if n < 2 else (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1)


@dataclass
class StepStats:
    """Steps the coordinator ran (engines only): count, time inside ``execute``, tokens and rows."""

    steps: int = 0
    execute_s: float = 0.0
    tokens: int = 0
    rows: int = 0


@dataclass
class RunResult:
    engine: str
    concurrency: int
    timings: list[RequestTiming]
    duration_s: float
    output_tokens: int
    computed_tokens: int  # output tokens generated, useful or not (static batches pad to the longest)
    steps: StepStats | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s

    @property
    def req_s(self) -> float:
        return len(self.timings) / self.duration_s


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values: Sequence[float]) -> tuple[float, float, float]:
    ms = [v * 1000 for v in values]
    return (statistics.fmean(ms) if ms else float("nan"), percentile(ms, 50), percentile(ms, 99))


# ---- engines --------------------------------------------------------------------------------------
class TimedExecutor:
    """Wraps an engine's executor to time its steps from outside (the library is not touched): the
    wall time while at least one step is in flight, from a ``launch`` (the step is sent) to the end
    of the ``collect`` that leaves none in flight."""

    def __init__(self, engine: Engine) -> None:
        self.stats = StepStats()
        self._launch = engine.executor.launch
        self._collect = engine.executor.collect_async
        self._in_flight = 0
        self._busy_since = 0.0
        engine.executor.launch = self.launch  # type: ignore[method-assign]
        engine.executor.collect_async = self.collect_async  # type: ignore[method-assign]

    def launch(self, steps: dict[int, Any]) -> Any:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        for chunks, _sampling in steps.values():
            self.stats.tokens += sum(len(c.token_ids) for c in chunks)
            self.stats.rows += len(chunks)
        return self._launch(steps)

    async def collect_async(self, launched: Any) -> Any:
        try:
            return await self._collect(launched)
        finally:
            self._in_flight -= 1
            self.stats.steps += 1
            if self._in_flight == 0:
                self.stats.execute_s += time.perf_counter() - self._busy_since


async def _one_request(engine: Engine, request: BenchRequest, t0: float, limit: asyncio.Semaphore,
                       from_arrival: bool) -> RequestTiming:
    await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
    arrived = time.perf_counter()
    async with limit:
        sent = time.perf_counter()
        times: list[float] = []
        params = SamplingParams(max_new_tokens=request.output_len, temperature=0.0, ignore_eos=True)
        async for out in engine.submit(request.prompt_ids, params):
            now = time.perf_counter()
            times.extend([now] * len(out.new_token_ids))
        if len(times) != request.output_len:
            raise RuntimeError(f"request {request.index}: {len(times)} tokens, expected {request.output_len}")
    return RequestTiming(arrived if from_arrival else sent, times)


async def engine_run(engine: Engine, name: str, requests: list[BenchRequest], concurrency: int,
                     from_arrival: bool, timer: TimedExecutor) -> RunResult:
    timer.stats = StepStats()
    limit = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    timings = await asyncio.gather(*[_one_request(engine, r, t0, limit, from_arrival) for r in requests])
    duration = max(t.token_times_s[-1] for t in timings) - t0
    tokens = sum(r.output_len for r in requests)
    return RunResult(name, concurrency, list(timings), duration, tokens, tokens, timer.stats)


def dispatch_totals(engine: Engine) -> tuple[int, float]:
    """(round trips, summed round-trip seconds) over every link of every attention worker."""
    snapshot = engine.executor.cluster.counters()  # type: ignore[attr-defined]
    trips, rtt_s = 0, 0.0

    def walk(node: Any) -> None:
        nonlocal trips, rtt_s
        if isinstance(node, dict):
            if "rtt_s_sum" in node and "dispatches" in node:
                trips += int(node["dispatches"])
                rtt_s += float(node["rtt_s_sum"])
            else:
                for value in node.values():
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(snapshot["attention"])
    return trips, rtt_s


class CpuMeter:
    """CPU time of the whole machine and of our processes (this one and the cluster workers) over a run.

    Other engineers' jobs share these cores; what they used during a run is reported beside it."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._hz = os.sysconf("SC_CLK_TCK")
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        fields_ = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = sum(fields_[:3]) + sum(fields_[5:8])  # user nice system, irq softirq steal
        ours = 0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            after_name = stat.rsplit(")", 1)[1].split()
            ours += int(after_name[11]) + int(after_name[12])  # utime stime
        return time.perf_counter(), busy / self._hz, ours / self._hz

    def stop(self) -> tuple[float, float]:
        """(cores our processes used, cores everything else used) on average since construction."""
        end = self._sample()
        elapsed = end[0] - self._start[0]
        ours = (end[2] - self._start[2]) / elapsed
        return ours, max(0.0, (end[1] - self._start[1]) / elapsed - ours)


class EngineUnderTest:
    """A started engine (cluster or local) whose steps are timed from outside."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self.engine = engine
        self.timer = TimedExecutor(engine)
        cluster = getattr(engine.executor, "cluster", None)
        self.pids = [os.getpid()] + ([int(i["pid"]) for i in cluster.worker_info] if cluster else [])

    async def run(self, requests: list[BenchRequest], concurrency: int, from_arrival: bool) -> RunResult:
        clustered = self.name == "cluster"
        before = dispatch_totals(self.engine) if clustered else (0, 0.0)
        meter = CpuMeter(self.pids)
        result = await engine_run(self.engine, self.name, requests, concurrency, from_arrival, self.timer)
        result.extra["cpu_ours"], result.extra["cpu_others"] = meter.stop()
        if clustered:
            after = dispatch_totals(self.engine)
            result.extra["dispatches"] = after[0] - before[0]
            result.extra["dispatch_rtt_s"] = after[1] - before[1]
        return result


class StepClock:
    """A StoppingCriteria that never stops and timestamps the end of every generation step."""

    def __init__(self) -> None:
        self.times_s: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times_s.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_generate_batch(model: Any, batch: list[BenchRequest], pad_token_id: int) -> tuple[float, list[float]]:
    """Greedy ``generate`` on one left-padded static batch: (start time, per-step end times)."""
    from transformers import StoppingCriteriaList

    width = max(len(r.prompt_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        input_ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids):] = 1
    new_tokens = max(r.output_len for r in batch)
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                             stopping_criteria=StoppingCriteriaList([clock]))
    if out.shape[1] != width + new_tokens or len(clock.times_s) != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - width} tokens in {len(clock.times_s)} steps, "
                           f"expected {new_tokens}")
    return start, clock.times_s


class HfStatic:
    """transformers ``generate`` over static batches of the requests, in arrival order."""

    name = "hf-static"

    def __init__(self, checkpoint: str) -> None:
        from transformers import Glm4MoeForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the checkpoint's MTP layer is "unexpected" to transformers
        self.model = Glm4MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        pad = self.model.config.pad_token_id
        self.pad_token_id = 0 if pad is None else pad
        self.pids = [os.getpid()]

    def run(self, requests: list[BenchRequest], concurrency: int, from_arrival: bool) -> RunResult:
        meter = CpuMeter(self.pids)
        t0 = time.perf_counter()
        timings: list[RequestTiming] = []
        computed = 0
        for first in range(0, len(requests), concurrency):
            batch = requests[first:first + concurrency]
            # a static batch starts when its last request has arrived and the previous batch is done
            time.sleep(max(0.0, t0 + batch[-1].arrival_s - time.perf_counter()))
            start, steps = hf_generate_batch(self.model, batch, self.pad_token_id)
            computed += len(batch) * len(steps)
            for r in batch:
                timings.append(RequestTiming(t0 + r.arrival_s if from_arrival else start, steps[:r.output_len]))
        duration = max(t.token_times_s[-1] for t in timings) - t0
        result = RunResult(self.name, concurrency, timings, duration, sum(r.output_len for r in requests), computed)
        result.extra["cpu_ours"], result.extra["cpu_others"] = meter.stop()
        return result


# ---- reporting ------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: list[RunResult]) -> str:
    headers = ["concurrency", "engine", "requests", "wall s", "output tok/s", "req/s",
               "TTFT mean ms", "TTFT p50", "TTFT p99", "TPOT mean ms", "TPOT p50", "TPOT p99",
               "CPU ours", "CPU others", "our CPU ms/token"]
    rows = []
    for r in sorted(results, key=lambda r: (r.concurrency, ENGINES.index(r.engine))):
        ttft = summary_ms([t.ttft_s for t in r.timings])
        tpot = summary_ms([t.tpot_s for t in r.timings if t.tpot_s is not None])
        rows.append([str(r.concurrency), r.engine, str(len(r.timings)), f"{r.duration_s:.1f}",
                     f"{r.output_tok_s:.0f}", f"{r.req_s:.2f}", *(f"{v:.1f}" for v in ttft),
                     *(f"{v:.1f}" for v in tpot), f"{r.extra.get('cpu_ours', 0):.2f}",
                     f"{r.extra.get('cpu_others', 0):.2f}", f"{cpu_ms_per_token(r):.2f}"])
    return markdown_table(headers, rows)


def cpu_ms_per_token(r: RunResult) -> float:
    """CPU time our processes spent per useful output token (prefill included)."""
    return r.extra.get("cpu_ours", 0.0) * r.duration_s / r.output_tokens * 1000


def by_key(results: list[RunResult]) -> dict[tuple[str, int], RunResult]:
    return {(r.engine, r.concurrency): r for r in results}


def ratio_table(results: list[RunResult], concurrencies: Sequence[int]) -> str:
    table = by_key(results)
    rows = []
    for c in concurrencies:
        def ratio(a: str, b: str, c: int = c) -> str:
            if (a, c) not in table or (b, c) not in table:
                return "-"
            return f"{table[a, c].output_tok_s / table[b, c].output_tok_s:.2f}x"
        hf = table.get(("hf-static", c))
        waste = f"{1 - hf.output_tokens / hf.computed_tokens:.0%}" if hf else "-"
        rows.append([str(c), ratio("cluster", "hf-static"), ratio("local", "hf-static"), ratio("cluster", "local"),
                     waste])
    return markdown_table(["concurrency", "cluster / hf-static", "local / hf-static", "cluster / local",
                           "hf-static padded tokens"], rows)


def steps_table(results: list[RunResult]) -> str:
    rows = []
    for r in sorted(results, key=lambda r: (r.concurrency, ENGINES.index(r.engine))):
        s = r.steps
        if s is None or not s.steps:
            continue
        if r.extra.get("dispatches"):
            trips = r.extra["dispatches"] / s.steps
            rtt = f"{trips:.1f} x {r.extra['dispatch_rtt_s'] / r.extra['dispatches'] * 1000:.2f}"
        else:
            rtt = "-"
        rows.append([str(r.concurrency), r.engine, str(s.steps), f"{s.rows / s.steps:.1f}",
                     f"{s.tokens / s.steps:.1f}", f"{s.execute_s / s.steps * 1000:.2f}",
                     f"{(r.duration_s - s.execute_s) / s.steps * 1000:.2f}", f"{s.execute_s / r.duration_s:.0%}",
                     rtt])
    return markdown_table(["concurrency", "engine", "steps", "seqs/step", "tokens/step", "execute ms/step",
                           "outside ms/step", "wall in execute", "dispatches/step x rtt ms"], rows)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(args: argparse.Namespace) -> str:
    return (f"{os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__} CPU; coordinator process "
            f"(`local`, `hf-static`) with {args.threads} torch thread(s); cluster workers with "
            f"{args.threads_per_worker} thread(s) each, on the same cores")


def reading(results: list[RunResult], concurrencies: Sequence[int], expert_workers: int) -> str:
    table = by_key(results)
    c = max(concurrencies)
    lines = []
    if ("cluster", c) in table and ("hf-static", c) in table:
        cl, hf = table["cluster", c], table["hf-static", c]
        ratio = cl.output_tok_s / hf.output_tok_s
        verdict = "meets" if ratio >= 2 else "does not meet"
        lines.append(f"* At concurrency {c} the cluster makes {cl.output_tok_s:.0f} output tok/s against "
                     f"{hf.output_tok_s:.0f} for static-batch transformers: {ratio:.2f}x, which {verdict} "
                     f"the 2x target. {1 - hf.output_tokens / hf.computed_tokens:.0%} of the tokens the "
                     f"static batches compute are padding past a request's own length.")
    if ("cluster", c) in table and ("local", c) in table:
        cl, lo = table["cluster", c], table["local", c]
        lines.append(f"* Distribution costs: at concurrency {c} the single-process engine makes "
                     f"{lo.output_tok_s:.0f} tok/s, the cluster {cl.output_tok_s / lo.output_tok_s:.2f}x of it.")
        if cl.steps and lo.steps and cl.steps.steps and lo.steps.steps:
            cs, ls = cl.steps, lo.steps
            trips = cl.extra.get("dispatches", 0) / cs.steps
            rtt_ms = cl.extra.get("dispatch_rtt_s", 0.0) / max(1.0, cl.extra.get("dispatches", 0)) * 1000
            layers = trips / expert_workers  # a layer's dispatches, one per expert worker, are in flight together
            cl_ms, lo_ms = cs.execute_s / cs.steps * 1000, ls.execute_s / ls.steps * 1000
            step = (f"  A cluster step takes {cl_ms:.1f} ms against {lo_ms:.1f} ms in process (same steps, "
                    f"{cs.tokens / cs.steps:.0f} tokens/step); it pays a step message each way (ZMQ, msgpack) "
                    f"and about {layers:.1f} expert round trips of {rtt_ms:.1f} ms, which include the experts' "
                    "own compute (done in process by the single-process engine)")
            if cl_ms <= lo_ms:
                step += (f"; the {expert_workers} expert workers compute a layer's routed experts in parallel, "
                         "on the core the single process leaves idle, which more than pays for both")
            lines.append(f"{step}. Our CPU per output token: cluster {cpu_ms_per_token(cl):.2f} ms, single "
                         f"process {cpu_ms_per_token(lo):.2f} ms.")
    if ("hf-static", c) in table and ("local", c) in table:
        hf, lo = table["hf-static", c], table["local", c]
        hf_tpot = summary_ms([t.tpot_s for t in hf.timings if t.tpot_s is not None])[0]
        lo_tpot = summary_ms([t.tpot_s for t in lo.timings if t.tpot_s is not None])[0]
        why = ("its static batches waste tokens, but its decode steps are cheaper and never share a step "
               "with another request's prefill" if hf_tpot < lo_tpot else
               "continuous batching adds prefill chunks to decode steps and still decodes faster")
        lines.append(f"* transformers' TPOT at batch {c} is {hf_tpot:.1f} ms against {lo_tpot:.1f} ms for the "
                     f"single-process engine: {why}.")
    others = [r.extra["cpu_others"] for r in results if "cpu_others" in r.extra]
    ours = [r.extra["cpu_ours"] for r in results if r.engine == "cluster" and "cpu_ours" in r.extra]
    if others:
        busy = statistics.mean(others)
        cores = os.cpu_count() or 1
        if busy >= 0.5:
            load = (f"other processes on the machine (Ray's daemons included) used {busy:.2f} of the {cores} "
                    "cores on average (CPU others), so the cluster's worker processes mostly took turns on "
                    "the cores that were left")
        else:
            load = (f"the machine was otherwise quiet (other processes, Ray's daemons included, used "
                    f"{busy:.2f} of the {cores} cores on average)")
        used = (f"; the cluster's own processes used {statistics.mean(ours):.2f} cores on average: a step "
                "is a chain of hand-offs (coordinator, attention worker, expert workers and back) more "
                "than a parallel computation") if ours else ""
        lines.append(
            f"* CPU: {load}{used}. Every process here, transformers' included, runs 1 torch thread and "
            "the same glibc malloc thresholds (`workers/malloc_tuning.py`).")
    return "\n".join(lines)


def preset_summary(preset: str) -> str:
    cfg = tiny_config(preset)
    return (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts "
            f"top-{cfg.num_experts_per_tok}, expert width {cfg.moe_intermediate_size}")


def command_line() -> str:
    return " ".join([".venv/bin/python", "benchmarks/serve.py", *map(shlex.quote, sys.argv[1:])])


def docs_section(args: argparse.Namespace, results: list[RunResult], concurrencies: Sequence[int]) -> str:
    mode = (f"Poisson arrivals at {args.request_rate} req/s, at most `concurrency` in flight"
            if args.request_rate else "all requests ready at t=0, `concurrency` in flight")
    return "\n".join([
        section_heading(args.preset, args.attention_workers, args.expert_workers), "",
        "```", command_line(), "```", "",
        f"Run {datetime.date.today().isoformat()} on {machine_line(args)}.", "",
        f"{', '.join(f'{requests_at(args, c)} requests at concurrency {c}' for c in concurrencies)} (the first "
        f"of one seeded list), prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs "
        f"{args.output_len[0]}-{args.output_len[1]} tokens (seed {args.seed}, greedy, `ignore_eos`), {mode}; "
        f"tiny \"{args.preset}\" checkpoint ({preset_summary(args.preset)}), float32. "
        f"`cluster`: `Engine.create` on local Ray "
        f"({args.attention_workers} attention + {args.expert_workers} expert workers); "
        "`local`: `Engine.create_local`; `hf-static`: transformers "
        f"`generate` on static left-padded batches of `concurrency` requests. TTFT and TPOT in ms.", "",
        results_table(results), "",
        "Output tokens/s relative to each other (padded tokens: share of the tokens static batches "
        "compute past a request's own length):", "",
        ratio_table(results, concurrencies), "",
        "Engine steps: wall time while a step was in flight (from `executor.launch` to the end of its "
        "`executor.collect_async`; overlapped scheduling sends a step before the last one is collected), per "
        "step; outside = the rest, the coordinator's own time per step while no step ran:", "",
        steps_table(results), "",
        "Reading:", "",
        reading(results, concurrencies, args.expert_workers), "",
    ])


def write_docs(section: str, heading: str) -> None:
    text = DOCS_PATH.read_text() if DOCS_PATH.exists() else DOCS_INTRO
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PATH.write_text(text)


# ---- main -----------------------------------------------------------------------------------------
def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    values = (int(low), int(high or low))
    if not 1 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW-HIGH with 1 <= LOW <= HIGH")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=None,
                        help=f"requests per concurrency (default: the larger of {MIN_REQUESTS} and "
                             f"{WAVES} x the concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--request-rate", type=float, default=None,
                        help="Poisson arrivals at this many requests/s (default: all at t=0)")
    parser.add_argument("--prompt-len", type=_range, default=(16, 256), help="LOW-HIGH tokens")
    parser.add_argument("--output-len", type=_range, default=(16, 128), help="LOW-HIGH tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--preset", default="air", help="workers.tiny preset of the checkpoint")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: a fresh tiny one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (local engine, transformers)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch threads of each cluster worker")
    parser.add_argument("--attention-workers", type=int, default=DEFAULT_SHAPE[0],
                        help="attention workers of the cluster")
    parser.add_argument("--expert-workers", type=int, default=DEFAULT_SHAPE[1], help="expert workers of the cluster")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches per cluster step taking turns while the experts compute")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                        help="send each engine step only after the last one's tokens are back")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="16 requests, concurrency 1 and 8, short outputs")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the Serving section of {DOCS_PATH}")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_requests, args.concurrency = 16, [1, 8]
        args.prompt_len, args.output_len = (16, 64), (8, 32)
    return args


def requests_at(args: argparse.Namespace, concurrency: int) -> int:
    """How many requests the run at ``concurrency`` sends."""
    return args.num_requests or max(MIN_REQUESTS, WAVES * concurrency)


async def run_all(engines: list[EngineUnderTest], hf: HfStatic | None, requests: dict[int, list[BenchRequest]],
                  warmup: list[BenchRequest], concurrencies: Sequence[int], from_arrival: bool) -> list[RunResult]:
    """Warm every engine up, then per concurrency run them back to back on the same requests."""
    for e in engines:
        await e.engine.start()
    try:
        for e in engines:
            await e.run(warmup, len(warmup), False)
        if hf is not None:
            hf.run(warmup, len(warmup), False)
        results = []
        for concurrency in concurrencies:
            for e in [*engines, *([hf] if hf else [])]:
                result = e.run(requests[concurrency], concurrency, from_arrival)
                result = await result if asyncio.iscoroutine(result) else result
                results.append(result)
                print(f"[{e.name}] concurrency {concurrency}: {result.output_tok_s:.0f} output tok/s "
                      f"(CPU: ours {result.extra['cpu_ours']:.2f}, others {result.extra['cpu_others']:.2f} cores)",
                      flush=True)
        return results
    finally:
        for e in engines:
            await e.engine.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()  # every engine in this process (transformers too) runs with the same malloc settings
    concurrencies = sorted(set(args.concurrency))
    from_arrival = args.request_rate is not None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(make_tiny(Path(tmp) / f"tiny-{args.preset}", preset=args.preset))
        vocab = int(json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"])
        every = make_requests(max(requests_at(args, c) for c in concurrencies), args.prompt_len, args.output_len,
                              vocab, args.seed, args.request_rate)
        requests = {c: every[:requests_at(args, c)] for c in concurrencies}
        warmup = make_requests(max(concurrencies), (16, 64), (4, 8), vocab, args.seed + 1, None)
        config = EngineConfig(checkpoint=checkpoint, address="local", num_attention_workers=args.attention_workers,
                              num_expert_workers=args.expert_workers,
                              num_kv_blocks=args.num_kv_blocks, block_size_tokens=16,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              max_num_seqs=max(256, max(concurrencies)), threads_per_worker=args.threads_per_worker,
                              micro_batches=args.micro_batches, async_scheduling=args.async_scheduling)
        for c, batch in requests.items():
            print(f"concurrency {c}: {len(batch)} requests, {sum(r.output_len for r in batch)} output tokens, "
                  f"{sum(len(r.prompt_ids) for r in batch)} prompt tokens", flush=True)
        print(machine_line(args), flush=True)
        engines: list[EngineUnderTest] = []
        try:
            # every engine stays up for the whole run, so each concurrency is measured on all of them
            # within the same minute or two of whatever else this machine is doing
            if "cluster" in args.engines:
                start = time.perf_counter()
                engines.append(EngineUnderTest("cluster", Engine.create(config)))
                print(f"[cluster] started in {time.perf_counter() - start:.1f} s", flush=True)
            if "local" in args.engines:
                engines.append(EngineUnderTest("local", Engine.create_local(config)))
            hf = HfStatic(checkpoint) if "hf-static" in args.engines else None
            results = asyncio.run(run_all(engines, hf, requests, warmup, concurrencies, from_arrival))
        finally:
            for e in engines:
                e.engine.executor.shutdown()  # idempotent; covers a failure before or during the run
    section = docs_section(args, results, concurrencies)
    print()
    print(section)
    if args.write_docs:
        write_docs(section, section_heading(args.preset, args.attention_workers, args.expert_workers))
        print(f"wrote {DOCS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
