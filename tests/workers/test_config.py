"""ModelConfig: reading config.json, validation naming the field, presets and parameter counts."""

from __future__ import annotations

import json

import pytest

from workers.config import PRESETS, ConfigError, ModelConfig


def test_presets_have_the_published_parameter_counts():
    air, full = PRESETS["glm-4.5-air"].parameter_counts(), PRESETS["glm-4.5"].parameter_counts()
    assert 105e9 < air["total"] < 108e9          # "106B"
    assert 11.5e9 < air["active_non_embedding"] < 12.5e9  # "12B active"
    assert 350e9 < full["total"] < 358e9         # "355B"
    assert 31e9 < full["active_non_embedding"] < 33e9     # "32B active"
    assert air["mtp"] > 0


def test_config_round_trips_through_json(tmp_path):
    config = PRESETS["glm-4.5"]
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert ModelConfig.from_file(tmp_path) == config


def test_transformers_5_rope_parameters_are_read():
    raw = PRESETS["glm-4.5-air"].to_dict()
    del raw["rope_theta"], raw["partial_rotary_factor"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.25}
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 5e5 and config.rotary_dim == 32


@pytest.mark.parametrize(("field", "value"), [
    ("model_type", "llama"), ("num_key_value_heads", 7), ("n_group", 3), ("topk_group", 2),
    ("num_experts_per_tok", 500), ("partial_rotary_factor", 0.0), ("hidden_act", "gelu"),
])
def test_bad_fields_are_named(field, value):
    raw = PRESETS["glm-4.5-air"].to_dict() | {field: value}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_missing_required_field_is_named():
    raw = PRESETS["glm-4.5-air"].to_dict()
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(raw)
