"""ConnectionWatch: which peers of a set of DEALER sockets have lost their connection.

One ZMQ socket monitor per socket reports its connect and disconnect events. A peer whose TCP
connection dropped (its process died) is lost until ZMQ, which keeps retrying, connects again.
The dispatcher (expert workers) and the coordinator's step channel (attention workers) use it to
fail what waits on a dead peer at once instead of at a timeout.
"""

from __future__ import annotations

from collections.abc import Mapping

import zmq
from zmq.utils.monitor import recv_monitor_message


class ConnectionWatch:
    def __init__(self, sockets: Mapping[int, zmq.Socket], poller: zmq.Poller) -> None:
        """Watch ``sockets`` (peer id -> socket); their monitors are registered with ``poller``."""
        self._sockets = list(sockets.values())
        self._peer_of: dict[zmq.Socket, int] = {}
        for peer, sock in sockets.items():
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
            poller.register(monitor, zmq.POLLIN)
            self._peer_of[monitor] = peer
        self.lost: set[int] = set()

    def owns(self, sock: zmq.Socket) -> bool:
        """Whether ``sock`` (from the poller) is one of the monitors."""
        return sock in self._peer_of

    def read(self, monitor: zmq.Socket) -> bool:
        """Read one event of ``monitor``; True if it made its peer lost."""
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return False
        peer = self._peer_of[monitor]
        if event["event"] == zmq.EVENT_CONNECTED:
            self.lost.discard(peer)
            return False
        self.lost.add(peer)
        return True

    def refresh(self) -> set[int]:
        """Read one pending event of every monitor (a lost peer may have come back); the lost peers."""
        for monitor in self._peer_of:
            self.read(monitor)
        return set(self.lost)

    def close(self) -> None:
        for sock in self._sockets:
            sock.disable_monitor()
        for monitor in self._peer_of:
            monitor.close()
