"""Shared fixtures: tiny checkpoints made by the project's own ``make-tiny`` (once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``tiny_checkpoint(preset, seed)`` → folder, cached per (preset, seed)."""
    made: dict[tuple[str, int], Path] = {}

    def get(preset: str = "air", seed: int = 0) -> Path:
        key = (preset, seed)
        if key not in made:
            made[key] = make_tiny(tmp_path_factory.mktemp(f"tiny-{preset}-{seed}"), seed=seed, preset=preset)
        return made[key]

    return get
