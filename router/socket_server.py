"""RouterSocketServer: a ROUTER socket served by its own thread, one reply per request.

The expert server (dispatches) and the attention worker's step server (engine steps) share this
loop: bind, then per message call ``handle`` with the request's frames and send back the frames
it returns to the sender. ``stop`` wakes the thread through an inproc pair (no polling
interval), closes the sockets and joins it; it is safe to call more than once.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

import zmq

HWM_MESSAGES = 1024


class RouterSocketServer:
    """Subclasses implement ``handle(frames) -> reply frames``; it must not raise. ``after_reply``
    runs after each reply is sent."""

    def __init__(self, name: str, bind_host: str = "127.0.0.1", port: int = 0) -> None:
        self._name = name
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
        self._socket.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
        self._socket.bind(f"tcp://{bind_host}:{port}")
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        wake = f"inproc://{name}-wake-{id(self)}"
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        self._wake_recv.bind(wake)
        self._wake_send = self._ctx.socket(zmq.PAIR)
        self._wake_send.connect(wake)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def handle(self, frames: list[zmq.Frame]) -> list[Any]:
        raise NotImplementedError

    def after_reply(self) -> None:
        """Called once each reply is sent: bookkeeping that need not delay it. Must not raise."""

    def start(self) -> RouterSocketServer:
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self._name} {self.endpoint} was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=f"{self._name} {self.endpoint}", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the sockets and join the thread. Safe to call more than once."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self._thread is not None:
                try:
                    self._wake_send.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # the serving thread already ended
                    pass
                self._thread.join()
            else:
                self._socket.close()
                self._wake_recv.close()
            self._wake_send.close()
            self._ctx.term()

    def __enter__(self) -> RouterSocketServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_recv in ready:
                    return
                # One message per poll: cheaper than reading until zmq.Again.
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                self._socket.send_multipart([frames[0], *self.handle(frames[1:])], copy=False)
                self.after_reply()
        finally:
            self._socket.close()
            self._wake_recv.close()
