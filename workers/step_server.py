"""StepServer: the attention worker's end of the step channel.

The coordinator sends each engine step over ZMQ (one DEALER per attention worker in the
coordinator, this ROUTER in the worker) instead of a Ray actor call: a step costs a message each
way and no pickling (``workers.step_wire``). The serving thread runs each step through the
callable it was given; a malformed message or a step that fails is answered with an error reply
and the thread keeps serving. Ray calls stay for setup, health and shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from router.socket_server import RouterSocketServer
from workers.batch import SequenceChunk
from workers.model_runner import RowSampling, StepOutput
from workers.step_wire import SamplingParamsCache, StepWireError, decode_step, encode_error, encode_output

log = logging.getLogger(__name__)

RunStep = Callable[[list[SequenceChunk], list[RowSampling]], StepOutput]


class StepServer(RouterSocketServer):
    def __init__(self, run: RunStep, bind_host: str = "127.0.0.1") -> None:
        self._run = run
        self._params = SamplingParamsCache()
        super().__init__("step-server", bind_host)

    def handle(self, frames: list[zmq.Frame]) -> list[bytes]:
        step_id = -1
        try:
            if len(frames) != 1:
                raise StepWireError(f"a step message is one frame, got {len(frames)}")
            step_id, chunks, sampling = decode_step(frames[0].bytes, self._params)
            return [encode_output(step_id, self._run(chunks, sampling))]
        except StepWireError as exc:
            log.warning("step server %s rejected a message: %s", self.endpoint, exc)
            return [encode_error(step_id, exc)]
        except Exception as exc:  # the step failed (e.g. an expert worker is gone): report, keep serving
            return [encode_error(step_id, exc)]
