"""Dispatch benchmark: the router's per-layer round trip against raw ZMQ, and cluster decode speed.

Part 1, per-layer dispatch. Expert servers (`router.expert_server.ExpertServer`) run in separate
processes (multiprocessing, spawn) on 127.0.0.1; their compute is a stand-in meant to be cheap
(each row of x scaled by the sum of its pairs' routing weights, via index_add), so what is timed
is mostly the transport and the dispatcher's own work, not the experts; the servers time the
stand-in and the table reports it per dispatch (it is not cheap on an AVX2 CPU, where torch
multiplies bfloat16 at about 0.5 ns per element). The dispatcher gets the C++ message builder,
combine and result reader, as an attention worker's does, and the expert servers the C++ dispatch
reader, as an expert worker's does. For each (tokens, workers) cell we time
`Dispatcher.submit(...).result()` with hidden size 4096 in bfloat16 and random top-8-of-128
routing. In the same run, interleaved iteration by iteration, a plain DEALER -> ROUTER echo (also
in separate processes) sends each of the same workers one multipart message with exactly the
frame sizes the dispatcher sends it for the same routing, and waits for replies with the frame
sizes the expert servers return. The ratio dispatch/raw is the router's overhead over the wire.

Part 2, decode. On a random "bench" preset checkpoint (workers.tiny) we time greedy decode steps
(the prefill step excluded) of the single-process model with 2 torch threads and of the cluster
(1 attention worker + 2 expert workers, 1 thread each, on a local Ray; start-up not timed), at
batch 1 and 32 with prompts of 16 random tokens.

    .venv/bin/python benchmarks/dispatch.py [--quick] [--write-docs]

With --write-docs the "Dispatch" section of docs/benchmarks.md is replaced by this run's tables.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import re
import shlex
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import zmq

from router import wire
from router.dispatcher import Dispatcher
from router.expert_server import ExpertServer
from router.placement import PlacementTable
from workers import cpu_kernels
from workers.malloc_tuning import tune_malloc

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_HEADING = "## Dispatch (benchmarks/dispatch.py)"
DOCS_INTRO = """# Benchmarks

Results of the programs in `benchmarks/`. Each section is written by its program (or by hand from
its output) and names the exact command, the date and the machine, so a figure can be reproduced
and compared. Figures from different machines are not comparable.
"""

HWM_MESSAGES = 1024  # as router.dispatcher / router.expert_server
REPLY_TIMEOUT_MS = 30_000
LAYER = 1  # the expert servers here ignore the layer; any id will do
STAND_IN_TIMES = "stand-in times"  # asks an expert server process for its stand-in's times
_SIZES = struct.Struct("<QQ")  # raw echo request header: reply header bytes, reply payload bytes


# ---- server processes ---------------------------------------------------------------------------
_stand_in_s: list[float] = []  # in an expert server process: the stand-in's time per dispatch


def _scaled_rows(
    layer: int, x: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor
) -> torch.Tensor:
    """Cheap stand-in for the experts: y[t] = x[t] * (sum of t's pair weights), shaped like x."""
    started = time.perf_counter()
    scale = torch.zeros(x.shape[0], dtype=torch.float32).index_add_(0, pair_token.long(), pair_weight)
    y = x * scale.to(x.dtype).unsqueeze(1)
    _stand_in_s.append(time.perf_counter() - started)
    return y


def _expert_server_main(conn: Connection, num_experts: int) -> None:
    """Serve until the parent sends None (or closes the pipe); STAND_IN_TIMES asks for the stand-in's times."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, Ctrl-C or not
    tune_malloc()  # as an expert worker does
    torch.set_num_threads(1)
    server = ExpertServer(_scaled_rows, num_experts, bind_host="127.0.0.1",
                          decode_dispatch=cpu_kernels.decode_dispatch()).start()  # as an expert worker's
    try:
        conn.send(server.endpoint)
        while conn.recv() == STAND_IN_TIMES:
            times = _stand_in_s[:]
            del _stand_in_s[:len(times)]
            conn.send(times)
    except EOFError:
        pass
    finally:
        server.stop()


def stand_in_times(conns: Sequence[Connection]) -> list[float]:
    """The stand-in's times in these expert servers since the last call (and forget them there)."""
    times: list[float] = []
    for conn in conns:
        conn.send(STAND_IN_TIMES)
    for conn in conns:
        if not conn.poll(30):
            raise RuntimeError("an expert server did not report its stand-in times within 30 s")
        times += conn.recv()
    return times


def _echo_server_main(conn: Connection) -> None:
    """ROUTER that answers each request with [header, payload] of the sizes packed in its first frame."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()  # the same process settings as the expert servers
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
    sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
    sock.bind("tcp://127.0.0.1:0")
    reply = memoryview(bytearray(1 << 16))  # grown on demand, never written: replies share it zero-copy
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(conn.fileno(), zmq.POLLIN)
    try:
        conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        while True:
            ready = dict(poller.poll())
            if conn.fileno() in ready:
                return
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                header_bytes, payload_bytes = _SIZES.unpack_from(frames[1].buffer)
                if max(header_bytes, payload_bytes) > len(reply):
                    reply = memoryview(bytearray(max(header_bytes, payload_bytes)))
                sock.send_multipart([frames[0], reply[:header_bytes], reply[:payload_bytes]], copy=False)
    finally:
        sock.close()
        ctx.term()


@contextmanager
def _server_processes(target: Callable[..., None], args: tuple,
                      count: int) -> Iterator[list[tuple[str, Connection]]]:
    """Start `count` spawned server processes; yield (endpoint, pipe) of each; always stop and join them."""
    ctx = mp.get_context("spawn")
    procs: list[tuple[mp.process.BaseProcess, Connection]] = []
    try:
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *args), daemon=True)
            # The child inherits a blocked SIGINT until it installs SIG_IGN: Ctrl-C is ours to handle.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child.close()
            procs.append((proc, parent))
        servers = []
        for proc, parent in procs:
            if not parent.poll(120):
                raise RuntimeError(f"server process {proc.pid} did not report its endpoint within 120 s")
            servers.append((parent.recv(), parent))
        yield servers
    finally:
        for _, parent in procs:
            try:
                parent.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc, parent in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            parent.close()


# ---- part 1: dispatch vs raw ZMQ ----------------------------------------------------------------
@dataclass
class Case:
    """One random routing and, per worker it touches, the frames the raw echo sends for it."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    raw_frames: dict[int, list[memoryview]]
    bytes_out: int  # payload bytes sent to all workers (headers included)
    bytes_in: int  # payload bytes of all replies


def make_cases(
    num_tokens: int, placement: PlacementTable, hidden_size: int, top_k: int, count: int, seed: int, zeros: memoryview
) -> list[Case]:
    """Random routings, with per-worker frame sizes computed the way the dispatcher groups pairs."""
    gen = torch.Generator().manual_seed(seed)
    item = torch.bfloat16.itemsize
    cases = []
    for _ in range(count):
        x = torch.randn(num_tokens, hidden_size, generator=gen).to(torch.bfloat16)
        topk_ids = torch.rand(num_tokens, placement.num_experts, generator=gen).topk(top_k, dim=1).indices
        topk_weights = torch.rand(num_tokens, top_k, generator=gen)
        topk_weights /= topk_weights.sum(dim=1, keepdim=True)
        worker_of_pair = placement.choose(topk_ids)
        frames: dict[int, list[memoryview]] = {}
        bytes_out = bytes_in = 0
        for worker in range(placement.num_workers):
            mine = worker_of_pair == worker
            pairs = int(mine.sum())
            if pairs == 0:
                continue
            rows = int(mine.any(dim=1).sum())
            sent = wire.encode(wire.Dispatch(1000, LAYER, x[:rows], torch.zeros(3, pairs, dtype=torch.int32)))
            back = wire.encode(wire.Result(1000, LAYER, x[:rows]))
            header = bytearray(len(sent[0]))
            _SIZES.pack_into(header, 0, len(back[0]), rows * hidden_size * item)
            frames[worker] = [memoryview(header), *(zeros[: memoryview(f).nbytes] for f in sent[1:])]
            bytes_out += wire.nbytes(sent)
            bytes_in += wire.nbytes(back)
        cases.append(Case(x, topk_ids, topk_weights, frames, bytes_out, bytes_in))
    return cases


class RawClient:
    """One DEALER per echo server, connected like the dispatcher's; sends a case and awaits every reply."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self._ctx = zmq.Context()
        self._sockets = []
        self._poller = zmq.Poller()
        for endpoint in endpoints:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
            sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
            sock.connect(endpoint)
            self._sockets.append(sock)
            self._poller.register(sock, zmq.POLLIN)

    def round_trip(self, case: Case) -> None:
        for worker, frames in case.raw_frames.items():
            self._sockets[worker].send_multipart(frames, copy=False)
        waiting = len(case.raw_frames)
        while waiting:
            ready = self._poller.poll(REPLY_TIMEOUT_MS)
            if not ready:
                raise TimeoutError(f"raw echo: {waiting} repl(ies) missing after {REPLY_TIMEOUT_MS} ms")
            for sock, _ in ready:
                while True:
                    try:
                        sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    waiting -= 1

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._ctx.term()


@dataclass
class CellResult:
    tokens: int
    workers: int
    iterations: int
    kib_out: float
    kib_in: float
    dispatch_s: list[float]
    submit_s: list[float]
    raw_s: list[float]
    stand_in_s: list[float]  # each expert server's stand-in compute, per message it served

    @property
    def stand_in_per_dispatch_s(self) -> float:
        """Stand-in compute per measured dispatch, summed over the workers it went to."""
        return sum(self.stand_in_s) / len(self.dispatch_s)


def _check(case: Case, y: torch.Tensor) -> None:
    expected = case.x.float() * case.topk_weights.sum(dim=1, keepdim=True)
    if not torch.allclose(y.float(), expected, rtol=2e-2, atol=1e-2):
        raise AssertionError("dispatch returned a wrong result; the figures would not mean anything")


def measure_cell(
    dispatcher: Dispatcher, raw: RawClient, cases: list[Case], warmup: int, min_iters: int, max_iters: int,
    budget_s: float, expert_conns: Sequence[Connection],
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Alternate dispatch and raw round trips (order flipped each iteration) over the cases; also
    the expert servers' stand-in times during the measured dispatches."""
    _check(cases[0], dispatcher.submit(LAYER, cases[0].x, cases[0].topk_ids, cases[0].topk_weights).result())
    dispatch_s: list[float] = []
    submit_s: list[float] = []
    raw_s: list[float] = []
    started = time.perf_counter()
    i = 0
    while i < warmup + min_iters or (i < warmup + max_iters and time.perf_counter() - started < budget_s):
        case = cases[i % len(cases)]
        for which in ("dispatch", "raw") if i % 2 else ("raw", "dispatch"):
            t0 = time.perf_counter()
            if which == "raw":
                raw.round_trip(case)
                t2 = time.perf_counter()
                if i >= warmup:
                    raw_s.append(t2 - t0)
            else:
                pending = dispatcher.submit(LAYER, case.x, case.topk_ids, case.topk_weights)
                t1 = time.perf_counter()
                pending.result()
                t2 = time.perf_counter()
                if i >= warmup:
                    dispatch_s.append(t2 - t0)
                    submit_s.append(t1 - t0)
        if i == warmup:
            started = time.perf_counter()
            stand_in_times(expert_conns)  # forget the warm-up's
        i += 1
    return dispatch_s, submit_s, raw_s, stand_in_times(expert_conns)


def run_dispatch(args: argparse.Namespace) -> list[CellResult]:
    torch.set_num_threads(1)  # like an attention worker with threads_per_worker=1
    max_workers = max(args.workers)
    zeros = memoryview(bytearray(max(args.tokens) * args.hidden_size * torch.bfloat16.itemsize))
    kernels = cpu_kernels.dispatch_kernels()  # as an attention worker passes them
    results = []
    with (
        _server_processes(_expert_server_main, (args.num_experts,), max_workers) as expert_servers,
        _server_processes(_echo_server_main, (), max_workers) as echo_servers,
    ):
        expert_endpoints = [endpoint for endpoint, _ in expert_servers]
        echo_endpoints = [endpoint for endpoint, _ in echo_servers]
        for workers in args.workers:
            placement = PlacementTable.even(args.num_experts, workers)
            dispatcher = Dispatcher(placement, dict(enumerate(expert_endpoints[:workers])), timeout_s=30.0,
                                    kernels=kernels)
            raw = RawClient(echo_endpoints[:workers])
            try:
                for tokens in args.tokens:
                    cases = make_cases(tokens, placement, args.hidden_size, args.top_k, args.routings,
                                       seed=tokens * 100 + workers, zeros=zeros)
                    dispatch_s, submit_s, raw_s, stand_in_s = measure_cell(
                        dispatcher, raw, cases, args.warmup, args.min_iters, args.max_iters, args.cell_budget_s,
                        [conn for _, conn in expert_servers[:workers]])
                    cell = CellResult(
                        tokens, workers, len(dispatch_s),
                        statistics.mean(c.bytes_out for c in cases) / 1024,
                        statistics.mean(c.bytes_in for c in cases) / 1024,
                        dispatch_s, submit_s, raw_s, stand_in_s)
                    results.append(cell)
                    print(f"  {tokens:>4} tokens, {workers} workers: dispatch {_ms(median(dispatch_s))} ms, "
                          f"raw {_ms(median(raw_s))} ms ({cell.iterations} iterations)", flush=True)
            finally:
                raw.close()
                dispatcher.close()
    return results


# ---- part 2: decode tokens/s ------------------------------------------------------------------
@dataclass
class DecodeResult:
    system: str
    batch: int
    step_s: list[float]  # per repeat: mean wall time of one decode step
    token_ids: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.batch / median(self.step_s)


def timed_decode(step: Callable, allocator: object, prompts: list[list[int]], decode_steps: int,
                 block_size_tokens: int) -> tuple[float, list[list[int]]]:
    """Mean wall time of a decode step: from the start of the first decode step to the loop's end."""
    from workers.generate import greedy_loop

    starts: list[float] = []

    def timed_step(chunks: list) -> torch.Tensor:
        starts.append(time.perf_counter())
        return step(chunks)

    result = greedy_loop(timed_step, allocator, prompts, decode_steps + 1, block_size_tokens)
    end = time.perf_counter()
    if len(starts) != decode_steps + 1:
        raise AssertionError(f"expected 1 prefill + {decode_steps} decode steps, ran {len(starts)}")
    return (end - starts[1]) / decode_steps, result.token_ids


def run_decode(args: argparse.Namespace) -> list[DecodeResult]:
    import ray

    from cluster.runtime import Cluster, ClusterConfig
    from workers.batch import build_batch
    from workers.generate import load_model
    from workers.kv_cache import PagedKVCache, blocks_needed
    from workers.tiny import make_tiny

    block_size_tokens = 16
    results: list[DecodeResult] = []
    with tempfile.TemporaryDirectory(prefix="moecluster-bench-") as tmp:
        checkpoint = make_tiny(Path(tmp) / "bench", seed=0, preset="bench")
        gen = torch.Generator().manual_seed(0)
        vocab_size = load_model_config_vocab(checkpoint)
        prompts = {b: torch.randint(0, vocab_size, (b, args.prompt_tokens), generator=gen).tolist()
                   for b in args.batches}

        torch.set_num_threads(2)
        model = load_model(checkpoint)
        for batch in args.batches:
            num_blocks = batch * blocks_needed(args.prompt_tokens + args.decode_steps + 1, block_size_tokens)
            steps, tokens = [], []
            for repeat in range(args.decode_repeats + 1):  # the first run is a warm-up
                kv = PagedKVCache(model.config, num_blocks, block_size_tokens)

                def step(chunks: list, kv: PagedKVCache = kv) -> torch.Tensor:
                    return model.forward(build_batch(chunks, block_size_tokens, "cpu"), kv).logits

                step_s, tokens = timed_decode(step, kv.allocator, prompts[batch], args.decode_steps,
                                              block_size_tokens)
                if repeat:
                    steps.append(step_s)
            results.append(DecodeResult("single process", batch, steps, tokens))
            print(f"  single, batch {batch}: {results[-1].tokens_per_s:.0f} tokens/s", flush=True)

        config = ClusterConfig(str(checkpoint), address="local", num_attention_workers=1, num_expert_workers=2,
                               threads_per_worker=1, block_size_tokens=block_size_tokens)
        # Our own fresh Ray instance: Cluster's ray.init() without an address would join any Ray
        # already running on this machine (another user's), and fails when it does.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                 resources={"attention": config.num_attention_workers, "expert": config.num_expert_workers})
        cluster = None
        try:
            cluster = Cluster.start(config)
            for batch in args.batches:
                steps, tokens = [], []
                for repeat in range(args.decode_repeats + 1):
                    step_s, tokens = timed_decode(lambda chunks: cluster.forward(0, chunks), cluster.allocators[0],
                                                  prompts[batch], args.decode_steps, block_size_tokens)
                    if repeat:
                        steps.append(step_s)
                results.append(DecodeResult("cluster", batch, steps, tokens))
                print(f"  cluster, batch {batch}: {results[-1].tokens_per_s:.0f} tokens/s", flush=True)
        finally:
            if cluster is not None:
                cluster.shutdown()
            ray.shutdown()
    return results


def load_model_config_vocab(checkpoint: Path) -> int:
    from workers.checkpoint import Checkpoint

    return Checkpoint(checkpoint).config.vocab_size


# ---- tables and docs ----------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def dispatch_table(cells: list[CellResult]) -> str:
    headers = ["tokens", "workers", "KiB out", "KiB in", "dispatch p50 ms", "dispatch p90 ms", "raw p50 ms",
               "raw p90 ms", "dispatch/raw", "submit() p50 ms", "stand-in ms/dispatch", "iterations"]
    rows = [[str(c.tokens), str(c.workers), f"{c.kib_out:.1f}", f"{c.kib_in:.1f}", _ms(median(c.dispatch_s)),
             _ms(p90(c.dispatch_s)), _ms(median(c.raw_s)), _ms(p90(c.raw_s)),
             f"{median(c.dispatch_s) / median(c.raw_s):.2f}x", _ms(median(c.submit_s)),
             _ms(c.stand_in_per_dispatch_s), str(c.iterations)]
            for c in cells]
    return markdown_table(headers, rows)


def decode_table(results: list[DecodeResult]) -> str:
    single = {r.batch: r for r in results if r.system == "single process"}
    headers = ["batch", "single tokens/s", "single ms/step", "cluster tokens/s", "cluster ms/step",
               "cluster/single", "same greedy tokens"]
    rows = []
    for r in results:
        if r.system != "cluster" or r.batch not in single:
            continue
        s = single[r.batch]
        rows.append([str(r.batch), f"{s.tokens_per_s:.1f}", _ms(median(s.step_s)), f"{r.tokens_per_s:.1f}",
                     _ms(median(r.step_s)), f"{r.tokens_per_s / s.tokens_per_s:.2f}x",
                     "yes" if r.token_ids == s.token_ids else "no"])
    return markdown_table(headers, rows)


def machine_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({model}), Linux {os.uname().release}, Python {sys.version.split()[0]}, "
            f"torch {torch.__version__}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})")


def load_average() -> str:
    """1-minute load average: other work on this small machine moves the figures, so we record it."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def dispatch_reading(cells: list[CellResult]) -> str:
    at64 = [c for c in cells if c.tokens == 64]
    lines = []
    if at64:
        ratios = ", ".join(f"{median(c.dispatch_s) / median(c.raw_s):.2f}x with {c.workers} worker(s)" for c in at64)
        met = all(median(c.dispatch_s) <= 2 * median(c.raw_s) for c in at64)
        lines.append(f"At 64 tokens dispatch/raw is {ratios}: the 2x target is {'met' if met else 'not met'}.")
        for c in at64:
            if c.workers == 1:  # one server: its stand-in runs on the round trip's path, whole
                rest = median(c.dispatch_s) - c.stand_in_per_dispatch_s
                lines.append(f"With one worker the stand-in's {_ms(c.stand_in_per_dispatch_s)} ms are on the "
                             f"round trip's path; the rest, {_ms(rest)} ms, is {rest / median(c.raw_s):.2f}x raw.")
    worst = max(cells, key=lambda c: median(c.dispatch_s) / median(c.raw_s))
    best = min(cells, key=lambda c: median(c.dispatch_s) / median(c.raw_s))
    lines.append(f"Across the grid the ratio runs from {median(best.dispatch_s) / median(best.raw_s):.2f}x "
                 f"({best.tokens} tokens, {best.workers} workers) to "
                 f"{median(worst.dispatch_s) / median(worst.raw_s):.2f}x ({worst.tokens} tokens, "
                 f"{worst.workers} workers); the absolute gap is dispatch p50 minus raw p50.")
    return " ".join(lines)


def decode_reading(results: list[DecodeResult]) -> str:
    single = {r.batch: r for r in results if r.system == "single process"}
    parts = []
    for r in results:
        if r.system == "cluster" and r.batch in single:
            extra_ms = (median(r.step_s) - median(single[r.batch].step_s)) * 1e3
            parts.append(f"at batch {r.batch} the cluster runs at {r.tokens_per_s / single[r.batch].tokens_per_s:.2f}x "
                         f"the single process ({extra_ms:+.1f} ms per decode step)")
    return ("Decode: " + "; ".join(parts) + ".") if parts else ""


def write_docs(section: str) -> None:
    text = DOCS_PATH.read_text() if DOCS_PATH.exists() else DOCS_INTRO
    pattern = re.compile(rf"^{re.escape(SECTION_HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PATH.write_text(text)


STATIC_READING = """\
Where the time goes (structural, independent of this run's figures):

* Both columns pay the same loopback TCP transfer and the same ZMQ framing (the same frames, sent
  zero-copy above pyzmq's 64 KiB copy threshold in both); on 2 cores the client and the servers
  also compete for CPU, so cells with 4 workers run 5 busy processes on 2 cores.
* The dispatcher adds, in `submit()`: one C++ call (`dispatch_messages` in
  `workers/csrc/wire_codec.cpp`, as an attention worker's dispatcher has it) that picks each
  pair's worker from the placement table and builds, per worker, its message: the msgpack
  header, its pairs as one [3, P] int32 frame (row, expert id, weight bits) and, for a worker
  that needs fewer than 80% of the tokens, its rows of x gathered; the sends go one after
  another. In `result()`: one C++ call per reply reads it (header, sizes, a view of the frame);
  a single reply covering every token is returned as received (no copy), otherwise one C++ pass
  (`workers/csrc/combine_replies.cpp`) sums the replies per token in float32 and rounds once to
  bfloat16. The expert server adds one C++ call reading each dispatch (views of the frames, the
  pair rows and expert ids bounded), the stand-in compute (its own column: a bfloat16 multiply
  of x in torch, slow on an AVX2 CPU) and encoding its reply; it counts the dispatch after
  replying.
* Each of these is a torch, numpy or pyzmq call of a few to tens of microseconds in a hot loop,
  but a round trip runs them after a wake-up, with the caches cold from the 0.5 MiB transfers,
  where they cost several times as much; so the fixed part dominates at a few tokens. With 4
  workers the whole machine is busy: the servers' stand-in compute alone is about half a raw
  round trip of CPU time, and 5 busy processes share 2 cores. Other work on the machine moves
  the ratio from run to run by a tenth or two (check the load average line).
* Decode: a cluster step is a Ray actor call (about 1 ms) plus, per MoE layer (3 here), a dispatch
  to both expert workers; 3 single-threaded worker processes, the driver and Ray's daemons share
  2 cores. The single process's 2 torch threads are fragile on 2 cores: when any other process is
  runnable a parallel region waits for a descheduled thread, and decode slows by an order of
  magnitude, so check the load average line before trusting a baseline.
"""


def docs_section(args: argparse.Namespace, cells: list[CellResult], decode: list[DecodeResult], load: str) -> str:
    command = ".venv/bin/python benchmarks/dispatch.py " + shlex.join(sys.argv[1:])
    out = [SECTION_HEADING, "",
           "Per-layer dispatch round trip of the router against a raw ZMQ echo of the same bytes, and decode",
           "tokens/s of the local cluster against the single-process model. How it measures: the module",
           "docstring of `benchmarks/dispatch.py`.", "",
           "```", command.strip(), "```", "",
           f"* Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
           f"* Machine: {machine_line()}",
           f"* 1-minute load average at start / end of the run: {load}"]
    if cells:
        out += [f"* Dispatch: hidden {args.hidden_size} bfloat16, top-{args.top_k} of {args.num_experts} experts, "
                f"random routing ({args.routings} routings cycled), experts placed evenly; benchmark process "
                f"with 1 torch thread, each server process 1 thread; the dispatcher has the C++ message builder, "
                f"combine and result reader, as an attention worker's does, the expert servers the C++ dispatch "
                f"reader, as an expert worker's does. Expert servers compute a stand-in for the experts "
                f"(x scaled by its summed routing weights, a bfloat16 multiply in torch); they time it, and "
                f"`stand-in ms/dispatch` is that time per dispatch summed over the workers it went to (on the "
                f"round trip's path with one worker, partly in parallel with more). KiB out/in: payload of "
                f"all frames to/from all workers per round trip (mean over the routings); the raw echo sends "
                f"and receives exactly these frame sizes. "
                f"`submit()` is the part of the dispatch spent before any reply is awaited.", "",
                "### Per-layer round trip", "", dispatch_table(cells), ""]
    if decode:
        out += [f"* Decode: `bench` preset (hidden 512, 4 layers, 64 experts top-8, float32), prompts of "
                f"{args.prompt_tokens} random tokens, {args.decode_steps} greedy decode steps timed after the "
                f"prefill step, median of {args.decode_repeats} runs after a warm-up run. Single process: torch "
                f"with 2 threads. Cluster: 1 attention worker + 2 expert workers, 1 thread each, local Ray "
                f"(start-up not timed); each step is a Ray actor call plus, per MoE layer, a ZMQ dispatch.", "",
                "### Decode", "", decode_table(decode), ""]
    out += ["### Reading", ""]
    if cells:
        out += [dispatch_reading(cells), ""]
    if decode:
        out += [decode_reading(decode), ""]
    out += [STATIC_READING]
    return "\n".join(out)


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (fewer cells and iterations)")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the Dispatch section of {DOCS_PATH}")
    parser.add_argument("--part", choices=["all", "dispatch", "decode"], default="all")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts per layer (default 1 8 64 256)")
    parser.add_argument("--workers", type=int, nargs="+", help="expert worker counts (default 1 2 4)")
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--num-experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--routings", type=int, default=16, help="random routings cycled through per cell")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up iterations per cell")
    parser.add_argument("--min-iters", type=int, help="measured iterations per cell, at least")
    parser.add_argument("--max-iters", type=int, help="measured iterations per cell, at most")
    parser.add_argument("--cell-budget-s", type=float, help="time per cell after min-iters")
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 32)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, help="timed decode steps per run (default 32)")
    parser.add_argument("--decode-repeats", type=int, help="timed decode runs per batch (default 3)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"tokens": [1, 64] if quick else [1, 8, 64, 256], "workers": [1, 2] if quick else [1, 2, 4],
                "min_iters": 20 if quick else 50, "max_iters": 200 if quick else 500,
                "cell_budget_s": 0.5 if quick else 1.5, "batches": [1, 32],
                "decode_steps": 16 if quick else 32, "decode_repeats": 1 if quick else 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    tune_malloc()  # this process is the attention side of both parts (and the single-process model)
    args = parse_args(argv)
    started = time.perf_counter()
    load_at_start = load_average()
    if load_at_start != "n/a" and float(load_at_start) > 1.0:
        print(f"warning: 1-minute load average is {load_at_start} before we start: other work on this machine "
              "will skew the figures (torch with 2 threads on 2 cores suffers most)", flush=True)
    cells: list[CellResult] = []
    decode: list[DecodeResult] = []
    if args.part in ("all", "dispatch"):
        print("Per-layer dispatch round trip (starting server processes)...", flush=True)
        cells = run_dispatch(args)
    if args.part in ("all", "decode"):
        print("Decode tokens/s...", flush=True)
        decode = run_decode(args)
    print()
    if cells:
        print("Per-layer dispatch round trip (ms; the experts are a stand-in, timed in its own column)")
        print(dispatch_table(cells))
        print(dispatch_reading(cells))
        print()
    if decode:
        print("Decode tokens/s (prefill excluded)")
        print(decode_table(decode))
        print(decode_reading(decode))
        print()
    load = f"{load_at_start} / {load_average()}"
    print(f"Machine: {machine_line()}; load average at start / end {load}; total {time.perf_counter() - started:.0f} s")
    if args.write_docs:
        write_docs(docs_section(args, cells, decode, load))
        print(f"wrote {DOCS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
