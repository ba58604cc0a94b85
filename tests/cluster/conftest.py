"""Ray fixtures for cluster tests: one local Ray instance per module, always shut down."""

from __future__ import annotations

import logging

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray node offering the custom resources attention and expert workers ask for."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, resources={"attention": 8, "expert": 8}, include_dashboard=False,
             logging_level=logging.WARNING)
    yield
    ray.shutdown()
