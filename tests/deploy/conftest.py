"""Shared pieces of the deployment tests: where the manifests and the upstream schemas are.

The schemas are data kept beside the repository (``<repo>/../shared/schemas``), not part of it;
tests that need them skip, naming the folder, when it is absent.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "schemas"


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    if not SCHEMAS.is_dir():
        pytest.skip(f"upstream schemas not found at {SCHEMAS} (the shared/ folder beside the repository)")
    return SCHEMAS


@pytest.fixture(scope="session")
def ray_pin() -> str:
    """The Ray version pyproject.toml pins (``ray==X``); images and rayVersion must match it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1] for d in deps if d.replace(" ", "").startswith("ray==")]
    assert pins, "pyproject.toml does not pin ray==X"
    return pins[0]
