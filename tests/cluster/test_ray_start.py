"""Starting the embedded local Ray: a node that fails to come up is started once more, then reported."""

from __future__ import annotations

import pytest
import ray

from cluster.errors import ClusterStartError
from cluster.runtime import LOCAL_RAY_START_ATTEMPTS, Cluster, ClusterConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def no_ray():
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def _failing_init(fail_times: int, calls: list[str]):
    """ray.init that raises as Ray does when a local node times out starting, ``fail_times`` times."""
    real_init = ray.init

    def init(*args, **kwargs):
        calls.append(kwargs.get("address"))
        if len(calls) <= fail_times:
            raise Exception("The current node timed out during startup (injected)")
        return real_init(*args, **kwargs)
    return init


def test_a_local_ray_that_fails_to_start_is_started_once_more(no_ray, tiny_checkpoint, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(ray, "init", _failing_init(1, calls))
    cluster = Cluster.start(ClusterConfig(str(tiny_checkpoint("air")), address="local", num_expert_workers=1))
    try:
        assert calls == ["local", "local"]
        assert sorted(info["role"] for info in cluster.worker_info) == ["attention", "expert"]
    finally:
        cluster.shutdown()
    assert not ray.is_initialized()


def test_a_local_ray_that_never_starts_is_a_clear_error(no_ray, tiny_checkpoint, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(ray, "init", _failing_init(LOCAL_RAY_START_ATTEMPTS, calls))
    with pytest.raises(ClusterStartError, match="could not start a local Ray instance: Exception: The current node "
                                                "timed out during startup"):
        Cluster.start(ClusterConfig(str(tiny_checkpoint("air")), address="local"))
    assert calls == ["local"] * LOCAL_RAY_START_ATTEMPTS and not ray.is_initialized()
