"""Live API servers for the tests: an engine and an ApiServer on an asyncio loop in a thread.

Tests talk to them with real gRPC clients over 127.0.0.1. ``ServerThread.call`` runs a coroutine on
the server's loop (to drive the engine directly, e.g. for reference outputs or KV accounting).
Every server is stopped in teardown, engine included, whatever the test did.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster import moecluster_pb2_grpc as pb_grpc
from cluster.engine import Engine, EngineConfig
from cluster.server import ApiServer, ServerConfig
from workers.sampling import SamplingParams


class ServerThread:
    """An ApiServer (and optionally a local engine) on its own event loop thread."""

    def __init__(self, server_config: ServerConfig, engine_config: EngineConfig | None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="api-server", daemon=True)
        self._thread.start()
        self.engine: Engine | None = None
        self.server = self.call(self._make_server(server_config))
        self.target = f"127.0.0.1:{self.server.port}"
        if engine_config is not None:
            self.attach(Engine.create_local(engine_config))

    async def _make_server(self, config: ServerConfig) -> ApiServer:
        server = ApiServer(config)
        await server.start()
        return server

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def attach(self, engine: Engine) -> None:
        async def attach() -> None:
            await engine.start()
            await self.server.attach_engine(engine)

        self.engine = engine
        self.call(attach())

    def reference(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str, list]:
        """The coordinator's own output for a request: (token ids, text, outputs)."""
        async def run() -> list:
            return [out async for out in self.engine.submit(prompt_ids, params)]

        outs = self.call(run())
        return [t for o in outs for t in o.new_token_ids], "".join(o.text_delta for o in outs), outs

    def kv_blocks_in_use(self) -> int:
        async def read() -> int:
            return self.engine.kv_blocks_in_use()

        return self.call(read())

    def stop(self) -> None:
        try:
            self.call(self.server.stop(0))
            if self.engine is not None:
                self.call(self.engine.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture(scope="session")
def tiny_air(tiny_checkpoint) -> Path:
    return tiny_checkpoint("air", 0)


@pytest.fixture
def start_server(tiny_air):
    """Factory: ``start_server(engine=True, **ServerConfig fields)`` → a running ServerThread."""
    started: list[ServerThread] = []

    def start(engine: bool | dict = True, **server_fields: Any) -> ServerThread:
        engine_config = None
        if engine:
            engine_config = EngineConfig(checkpoint=str(tiny_air), **(engine if isinstance(engine, dict) else {}))
        server = ServerThread(ServerConfig(port=0, **server_fields), engine_config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def api(tiny_checkpoint):
    """One shared server on a local engine for the tests that do not change its state."""
    server = ServerThread(ServerConfig(port=0), EngineConfig(checkpoint=str(tiny_checkpoint("air", 0))))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(api):
    with grpc.insecure_channel(api.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.MoeClusterStub(channel)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key, made with the openssl command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True)
    return cert, key
