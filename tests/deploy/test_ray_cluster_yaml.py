"""cluster/ray-cluster.yaml, the `ray up` config, checked offline the way the cluster launcher
checks it: Ray's own prepare_config (defaults merged) then validate_config (ray-schema.json)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.deploy.conftest import REPO

CONFIG = REPO / "cluster" / "ray-cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_the_cluster_launcher_accepts_it(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_node_types_offer_the_worker_resources_and_gpus(config):
    types = config["available_node_types"]
    assert sorted(types) == ["attention", "expert", "head"]
    for role in ("attention", "expert"):
        resources = types[role]["resources"]
        assert resources[role] >= 1 and resources["GPU"] == resources[role], role
        other = "expert" if role == "attention" else "attention"
        assert other not in resources, f"{role} nodes must not offer '{other}'"
        assert types[role]["min_workers"] >= 1, role
    assert not {"attention", "expert", "GPU"} & set(types["head"]["resources"])


def test_image_matches_the_ray_pin(config, ray_pin):
    assert config["docker"]["image"] == f"rayproject/ray:{ray_pin}-py311-gpu"


def test_the_launcher_would_refuse_a_node_type_without_resources(config):
    broken = copy.deepcopy(config)
    del broken["available_node_types"]["expert"]["resources"]
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(broken))
