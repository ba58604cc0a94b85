"""make-tiny: deterministic checkpoints in the official layout; expert shards read only their bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from workers.checkpoint import Checkpoint
from workers.experts import ExpertShard, expert_predicate
from workers.model import Glm4MoeForCausalLM
from workers.tiny import PRESETS, make_tiny


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a, b, c = (make_tiny(tmp_path / n, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(_digest(a))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_write_the_official_names_and_mtp_layer(tiny_checkpoint, preset):
    ckpt = Checkpoint(tiny_checkpoint(preset))
    config = ckpt.config
    names = set(ckpt.names())
    n = config.mtp_layer_index
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                   f"mlp.experts.{config.n_routed_experts - 1}.down_proj.weight"):
        assert f"model.layers.{n}.{suffix}" in names
    assert ("model.layers.1.self_attn.q_norm.weight" in names) == config.use_qk_norm
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == config.attention_bias
    assert ckpt.shape(f"model.layers.{n}.eh_proj.weight") == (config.hidden_size, 2 * config.hidden_size)
    index = ckpt.folder / "model.safetensors.index.json"
    assert index.exists() == (PRESETS[preset][1] > 1)


def test_expert_shard_reads_a_small_fraction_of_the_checkpoint(tiny_checkpoint):
    folder = tiny_checkpoint("sharded")
    total_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    ckpt = Checkpoint(folder)
    config = ckpt.config
    mine = [0, 1]
    tensors = ckpt.load(expert_predicate(config, mine), ckpt.config.torch_dtype_as_torch())
    shard = ExpertShard.from_tensors(config, mine, tensors)
    assert set(tensors) == set(shard.tensor_names())
    assert len(tensors) == 3 * len(mine) * len(config.moe_layer_indices)
    assert ckpt.bytes_read < 0.15 * total_bytes, (ckpt.bytes_read, total_bytes)


def test_attention_part_reads_no_expert_bytes(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint("air"))
    loaded = ckpt.load(Glm4MoeForCausalLM.owns_tensor(ckpt.config), ckpt.config.torch_dtype_as_torch())
    assert not any(".mlp.experts." in name for name in loaded)
    Glm4MoeForCausalLM.from_tensors(ckpt.config, loaded)  # exactly the tensors the model needs


def test_cli_make_tiny(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "make-tiny", str(tmp_path / "m"), "--preset",
                          "glm45", "--seed", "7"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["preset"] == "glm45"
    assert Checkpoint(tmp_path / "m").config.use_qk_norm
