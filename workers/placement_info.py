"""Where a worker runs: the Ray node id and IP when inside Ray, the host otherwise."""

from __future__ import annotations

import socket


def node_identity() -> dict[str, str]:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except ImportError:  # workers run without Ray in unit tests
        pass
    return {"node_id": socket.gethostname(), "node_ip": "127.0.0.1"}
