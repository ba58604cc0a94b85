"""The real thing: `make demo`'s program and `moecluster serve` on a local Ray cluster (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from cluster import moecluster_pb2 as pb
from cluster import moecluster_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def session_processes(sid: int) -> list[str]:
    """Command lines of the live processes in session ``sid`` (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            found.append(cmdline.strip())
    return found


def test_demo(tmp_path):
    env = {**os.environ, "MOECLUSTER_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "cluster.demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "streamed (chat):" in out and "unary (greedy):" in out
    assert "24 tokens" in out
    for row in ("attention  0", "expert     0", "expert     1", "KV BLOCKS USED"):
        assert row in out
    assert out.rstrip().endswith("stopped: gRPC server, workers and Ray")


def test_serve_generate_status_and_ctrl_c(tiny_checkpoint):
    checkpoint = tiny_checkpoint("air", 0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", str(checkpoint), "--port", "0", "--grace-s", "30"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    try:
        line = proc.stdout.readline()  # "moecluster: serving <name> on <host>:<port> ..." once workers are ready
        assert "serving" in line, (line, "".join(stderr))
        target = line.split(" on ")[1].split()[0]
        cli = [sys.executable, "-m", "cluster.cli"]
        generated = subprocess.run([*cli, "generate", "Hello", "--target", target, "--max-tokens", "5",
                                    "--stream"], capture_output=True, text=True, timeout=60)
        assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
        status = subprocess.run([*cli, "status", "--target", target], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        rows = [line.split()[0] for line in status.stdout.splitlines() if line.strip()]
        assert rows.count("expert") == 2 and rows.count("attention") == 1

        # Ctrl-C (SIGINT to the whole foreground group) while a stream runs: it finishes, then all stops.
        with grpc.insecure_channel(target) as channel:
            stream = pb_grpc.MoeClusterStub(channel).GenerateStream(pb.GenerateRequest(
                prompt="drain me", sampling=pb.SamplingParams(max_new_tokens=100, ignore_eos=True)), timeout=120)
            first = next(stream)
            os.killpg(proc.pid, signal.SIGINT)
            rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 100
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(120) == 0, "".join(stderr)
        assert "moecluster: stopped" in "".join(stderr)
        deadline = time.monotonic() + 30
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert session_processes(proc.pid) == [], "processes of the server outlived it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
