"""The ``moecluster`` command line: one subcommand per operator task.

``serve`` runs a cluster and its gRPC API; ``generate`` and ``status`` are clients of a running
server; ``make-tiny`` writes a tiny checkpoint. Heavy modules (torch, Ray) are imported by the
subcommands that need them, so the clients start quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from cluster import moecluster_pb2 as pb
from cluster import moecluster_pb2_grpc as pb_grpc
from cluster.auth import call_metadata, open_channel
from cluster.errors import ClusterError

DEFAULT_TARGET = "127.0.0.1:50051"
TINY_PRESET, TINY_SEED = "air", 0


# ---- the bundled tiny model --------------------------------------------------------------------------
def moecluster_home() -> Path:
    return Path(os.environ.get("MOECLUSTER_HOME") or Path.home() / ".cache" / "moecluster")


def default_checkpoint() -> Path:
    """The bundled tiny GLM-4.5-Air-architecture checkpoint, built on first use (no download)."""
    folder = moecluster_home() / f"tiny-{TINY_PRESET}-{TINY_SEED}"
    if not (folder / "config.json").is_file():
        from workers.tiny import make_tiny

        folder.parent.mkdir(parents=True, exist_ok=True)
        # Build beside it and rename, so a concurrent first use never sees half a checkpoint.
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        make_tiny(staging, seed=TINY_SEED, preset=TINY_PRESET)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return folder


# ---- serve --------------------------------------------------------------------------------------------
def _add_security_flags(parser: argparse.ArgumentParser, server: bool) -> None:
    parser.add_argument("--token", default=os.environ.get("MOECLUSTER_TOKEN"),
                        help="bearer token (default: $MOECLUSTER_TOKEN)")
    if server:
        parser.add_argument("--tls-cert", help="PEM certificate (chain) for TLS")
        parser.add_argument("--tls-key", help="PEM private key for TLS")
    else:
        parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
        parser.add_argument("--tls-ca", help="PEM certificate(s) to trust (implies --tls)")


def _progress(message: str, done: threading.Event) -> None:
    """An elapsed-time bar on stderr until ``done`` is set (the cluster does not report finer steps)."""
    start = time.monotonic()
    tty = sys.stderr.isatty()
    last_printed = -1
    while not done.wait(0.2):
        elapsed = time.monotonic() - start
        if tty:
            bar = "#" * (int(elapsed * 2) % 21)
            print(f"\r{message} [{bar:<20}] {elapsed:5.1f} s", end="", file=sys.stderr, flush=True)
        elif int(elapsed) // 5 > last_printed:
            last_printed = int(elapsed) // 5
            print(f"{message} ... {elapsed:.0f} s", file=sys.stderr, flush=True)
    print(f"\r{message}: done in {time.monotonic() - start:.1f} s" + " " * 20, file=sys.stderr, flush=True)


async def serve(args: argparse.Namespace) -> None:
    from cluster.engine import Engine, EngineConfig
    from cluster.server import ApiServer, ServerConfig

    server = ApiServer(ServerConfig(host=args.host, port=args.port, tls_cert_file=args.tls_cert,
                                    tls_key_file=args.tls_key, token=args.token))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    print(f"moecluster: gRPC API on {args.host}:{port}{' (TLS)' if server.tls else ''}; "
          "health NOT_SERVING while the workers load", file=sys.stderr, flush=True)
    checkpoint = Path(args.model) if args.model else default_checkpoint()
    config = EngineConfig(
        checkpoint=str(checkpoint), address=args.address, num_attention_workers=args.attention_workers,
        num_expert_workers=args.expert_workers, expert_replicas=args.expert_replicas, dtype=args.dtype,
        num_kv_blocks=args.num_kv_blocks, block_size_tokens=args.block_size, num_gpus_per_worker=args.gpus_per_worker,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting_requests=args.max_waiting_requests, threads_per_worker=args.threads_per_worker,
        micro_batches=args.micro_batches, async_scheduling=args.async_scheduling,
        start_timeout_s=args.start_timeout, dispatch_timeout_s=args.dispatch_timeout, step_timeout_s=args.step_timeout,
        model_name=args.name)
    done = threading.Event()
    ticker = threading.Thread(target=_progress, daemon=True, args=(
        f"loading {checkpoint.name} into {args.attention_workers} attention + {args.expert_workers} expert "
        f"workers", done))
    ticker.start()
    try:
        engine = await asyncio.to_thread(Engine.create, config)
    except BaseException:
        await server.stop(0)
        raise
    finally:
        done.set()
        ticker.join()
    await engine.start()
    await server.attach_engine(engine)
    print(f"moecluster: serving {engine.model_name} on {args.host}:{port} (Ctrl-C stops)", flush=True)
    await stop.wait()
    print(f"moecluster: draining (up to {args.grace_s:g} s), then stopping the workers", file=sys.stderr, flush=True)
    await server.stop(args.grace_s)
    await engine.stop()
    print("moecluster: stopped", file=sys.stderr, flush=True)


def serve_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="moecluster serve", description="Run a cluster and its gRPC API.")
    parser.add_argument("model", nargs="?", help="checkpoint folder (default: the bundled tiny model, built on "
                                                 "first use under $MOECLUSTER_HOME or ~/.cache/moecluster)")
    parser.add_argument("--name", help="the model's name in the API (default: the folder's name)")
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--expert-workers", type=int, default=2)
    parser.add_argument("--expert-replicas", type=int, default=1, help="copies of each expert")
    parser.add_argument("--address", default="local",
                        help="local (start Ray here), auto (join the running Ray cluster) or ray://host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=50051, help="0: any free port")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--num-kv-blocks", type=int, default=1024, help="KV blocks per attention worker")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="token budget of one engine step (prefill chunks + decodes)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch threads of each worker (CPU)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches per attention-worker step that take turns while experts compute")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                        help="send each step only after the last one's tokens are back (default: overlapped)")
    parser.add_argument("--start-timeout", type=float, default=180.0,
                        help="seconds every worker may take to load its weights")
    parser.add_argument("--dispatch-timeout", type=float, default=30.0,
                        help="seconds an expert worker may take to answer one dispatch")
    parser.add_argument("--step-timeout", type=float, default=120.0,
                        help="seconds an attention worker may take to answer one step (> --dispatch-timeout)")
    parser.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="queue limit; beyond it RESOURCE_EXHAUSTED")
    parser.add_argument("--grace-s", type=float, default=10.0, help="how long Ctrl-C lets requests finish")
    _add_security_flags(parser, server=True)
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    try:
        asyncio.run(serve(args))
    except (ClusterError, ValueError) as exc:  # bad settings, Ray or workers that would not start
        parser.exit(1, f"moecluster serve: error: {exc}\n")


# ---- clients ------------------------------------------------------------------------------------------
def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("MOECLUSTER_TARGET", DEFAULT_TARGET),
                        help=f"server address (default: $MOECLUSTER_TARGET or {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of the call in seconds")
    parser.add_argument("--json", action="store_true", help="print the replies as JSON")
    _add_security_flags(parser, server=False)


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_new_tokens=args.max_tokens, stop=args.stop or [], ignore_eos=args.ignore_eos)
    for flag, field in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                        ("min_p", "min_p"), ("seed", "seed"), ("logprobs", "logprobs")):
        if getattr(args, flag) is not None:
            setattr(sampling, field, getattr(args, flag))
    request = pb.GenerateRequest(model=args.model or "", sampling=sampling)
    if args.chat:
        if args.system:
            request.messages.add(role="system", content=args.system)
        request.messages.add(role="user", content=args.prompt)
        if args.no_thinking:
            request.enable_thinking = False
    else:
        request.prompt = args.prompt
    return request


def _to_json(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


async def _generate(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    request = build_request(args)
    metadata = call_metadata(args.token)
    async with open_channel(args.target, args.tls_ca, args.tls) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        if args.stream:
            async for reply in stub.GenerateStream(request, metadata=metadata, timeout=args.timeout):
                out(_to_json(reply) + "\n" if args.json else reply.text)
            if not args.json:
                out("\n")
        else:
            reply = await stub.Generate(request, metadata=metadata, timeout=args.timeout)
            out(_to_json(reply) + "\n" if args.json else reply.text + "\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_client(coro: Any) -> None:
    try:
        asyncio.run(coro)
    except grpc.aio.AioRpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        raise SystemExit(1) from None


def generate_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="moecluster generate", description="Generate text with a running server.")
    parser.add_argument("prompt")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--system", help="with --chat: a system message first")
    parser.add_argument("--no-thinking", action="store_true", help="with --chat: turn the template's thinking off")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    parser.add_argument("--model", help="model name (default: the served one)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--logprobs", type=int, help="return logprobs with this many top alternatives (with --json)")
    _add_client_flags(parser)
    args = parser.parse_args(argv)
    if (args.system or args.no_thinking) and not args.chat:
        parser.error("--system and --no-thinking need --chat")
    _run_client(_generate(args, _write))


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    start = prev = None
    for i in [*ids, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if start is None and i is not None:
            start = i
        prev = i
    return ",".join(parts) or "-"


def format_status(status: pb.ClusterStatus) -> str:
    """The cluster as a readable table: workers, KV cache, queue and expert placement."""
    lines = [f"model {status.model}   ready: {'yes' if status.ready else 'NO'}   queue: {status.queue.waiting} "
             f"waiting, {status.queue.running} running (limit {status.queue.max_waiting or 'none'})", ""]
    experts_of: dict[int, list[int]] = {}
    for expert, replicas in enumerate(status.placement.experts):
        for worker in replicas.workers:
            experts_of.setdefault(worker, []).append(expert)
    kv = {k.worker: k for k in status.kv}
    rows = [("ROLE", "INDEX", "NODE", "STATE", "LOAD", "KV BLOCKS USED", "EXPERTS")]
    for w in sorted(status.workers, key=lambda w: (not w.role.startswith("attention"), w.index)):
        kv_text = experts = ""
        if w.role.startswith("attention") and w.index in kv:
            k = kv[w.index]
            kv_text = f"{k.num_blocks - k.free_blocks}/{k.num_blocks} x {k.block_size_tokens} tok"
        if w.role == "expert":
            experts = _ranges(experts_of.get(w.index, []))
        node = w.node_id if len(w.node_id) <= 12 else w.node_id[:12] + "…"
        load = f"{w.load:.0f} tok/s" if w.role == "expert" else f"{w.load:g} running"
        rows.append((w.role, str(w.index), node, w.state, load, kv_text, experts))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"\nplacement v{status.placement.version}: {len(status.placement.experts)} routed experts over "
                 f"{status.placement.num_expert_workers} expert worker(s)")
    return "\n".join(lines)


async def fetch_status(target: str, token: str | None = None, tls_ca: str | None = None, tls: bool = False,
                       timeout_s: float = 10.0) -> pb.ClusterStatus:
    async with open_channel(target, tls_ca, tls) as channel:
        return await pb_grpc.MoeClusterStub(channel).GetClusterStatus(
            pb.GetClusterStatusRequest(), metadata=call_metadata(token), timeout=timeout_s)


async def _status(args: argparse.Namespace) -> None:
    status = await fetch_status(args.target, args.token, args.tls_ca, args.tls, args.timeout)
    _write((_to_json(status) if args.json else format_status(status)) + "\n")


def status_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="moecluster status", description="Show a running cluster.")
    _add_client_flags(parser)
    parser.set_defaults(timeout=10.0)
    _run_client(_status(parser.parse_args(argv)))


def make_tiny_main(argv: Sequence[str]) -> None:
    from workers import tiny

    tiny.main(list(argv))


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "serve": serve_main,
    "generate": generate_main,
    "status": status_main,
    "make-tiny": make_tiny_main,
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: moecluster {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    main()
