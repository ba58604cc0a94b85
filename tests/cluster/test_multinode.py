"""Placement on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this machine)."""

from __future__ import annotations

import logging

import pytest
import ray
from ray.cluster_utils import Cluster as RayTestCluster

from cluster.errors import ClusterStartError
from cluster.runtime import Cluster, ClusterConfig
from workers.generate import generate, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_nodes():
    """A head node without custom resources, one attention node and two expert nodes."""
    if ray.is_initialized():
        ray.shutdown()
    nodes = RayTestCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes.add_node(num_cpus=1, resources={"attention": 1})
        nodes.add_node(num_cpus=1, resources={"expert": 1})
        nodes.add_node(num_cpus=1, resources={"expert": 1})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, logging_level=logging.WARNING)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_attention_and_experts_land_on_their_own_nodes(ray_nodes, tiny_checkpoint):
    folder = tiny_checkpoint("air")
    config = ClusterConfig(str(folder), address="auto", num_attention_workers=1, num_expert_workers=2,
                           bind_host="127.0.0.1")
    with Cluster.start(config) as cluster:
        by_role = {}
        for info in cluster.worker_info:
            by_role.setdefault(info["role"], []).append(info["node_id"])
        assert len(set(by_role["expert"])) == 2
        assert set(by_role["attention"]).isdisjoint(by_role["expert"])
        head = ray.get_runtime_context().get_node_id()
        assert head not in by_role["expert"] + by_role["attention"]
        prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
        want = generate(load_model(folder), prompts, 8).token_ids
        assert cluster.generate(prompts, 8).token_ids == want


def test_more_workers_than_nodes_fails_with_a_clear_error(ray_nodes, tiny_checkpoint):
    config = ClusterConfig(str(tiny_checkpoint("air")), address="auto", num_expert_workers=3,
                           bind_host="127.0.0.1", start_timeout_s=8)
    with pytest.raises(ClusterStartError, match="expert"):
        Cluster.start(config)
