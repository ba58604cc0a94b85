"""The README's first command: start the embedded cluster, generate, print the status, stop.

It builds (or finds) the bundled tiny checkpoint, starts a local Ray cluster with one attention and
two expert workers and the gRPC API on a free port of 127.0.0.1, then acts as a client: one
streamed chat request, one unary request and the cluster status table. Everything is stopped before
it exits, also on failure. The tiny model's weights are random, so its text is noise; the point is
the path the tokens take.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from cluster import moecluster_pb2 as pb
from cluster import moecluster_pb2_grpc as pb_grpc
from cluster.auth import open_channel
from cluster.cli import default_checkpoint, format_status

NUM_ATTENTION_WORKERS = 1
NUM_EXPERT_WORKERS = 2


async def client(target: str) -> None:
    async with open_channel(target) as channel:
        stub = pb_grpc.MoeClusterStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        print(f"model {info.name}: {info.architecture}, {info.parameters.total:,} parameters "
              f"({info.parameters.active:,} active), context {info.context_length} tokens\n")

        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Hello! Who are you?")],
                                     sampling=pb.SamplingParams(max_new_tokens=24, temperature=0.7, seed=1))
        print("streamed (chat):  ", end="", flush=True)
        start = time.perf_counter()
        last = None
        async for reply in stub.GenerateStream(request, timeout=120):
            print(reply.text, end="", flush=True)
            last = reply
        print(f"\n  -> {last.usage.completion_tokens} tokens in {time.perf_counter() - start:.2f} s, "
              f"finish {pb.FinishReason.Name(last.finish_reason)}\n")

        request = pb.GenerateRequest(prompt="The experts of a mixture-of-experts model",
                                     sampling=pb.SamplingParams(max_new_tokens=24, temperature=0.0))
        reply = await stub.Generate(request, timeout=120)
        print(f"unary (greedy):   {reply.text!r}\n  -> token ids {list(reply.token_ids)[:8]}..., "
              f"{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens\n")

        print(format_status(await stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)))


async def serve_and_ask(engine) -> None:
    from cluster.server import ApiServer, ServerConfig

    server = ApiServer(ServerConfig(host="127.0.0.1", port=0))
    try:
        await engine.start()
        port = await server.start()
        await server.attach_engine(engine)
        print(f"gRPC API on 127.0.0.1:{port}\n", flush=True)
        await client(f"127.0.0.1:{port}")
    finally:
        await server.stop(5)
        await engine.stop()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from cluster.engine import Engine, EngineConfig

    checkpoint = default_checkpoint()
    print(f"tiny GLM-4.5-Air-architecture checkpoint: {checkpoint}", flush=True)
    print(f"starting Ray with {NUM_ATTENTION_WORKERS} attention and {NUM_EXPERT_WORKERS} expert workers ...",
          flush=True)
    start = time.perf_counter()
    engine = Engine.create(EngineConfig(
        checkpoint=str(checkpoint), address="local", num_attention_workers=NUM_ATTENTION_WORKERS,
        num_expert_workers=NUM_EXPERT_WORKERS))
    print(f"cluster up in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        asyncio.run(serve_and_ask(engine))
    finally:
        engine.executor.shutdown()  # idempotent; stops the workers and Ray even if the loop never ran
    print("\nstopped: gRPC server, workers and Ray", flush=True)


if __name__ == "__main__":
    main()
