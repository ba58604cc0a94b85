"""Checkpoint reading and writing on small ``glm4_moe`` checkpoints built in ``tmp_path``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from workers.checkpoint import Checkpoint, CheckpointError
from workers.checkpoint_writer import (
    compressed_tensors_quantization_config,
    is_fp8_quantized,
    quantize_fp8_block,
    quantize_fp8_channel,
    write_checkpoint,
    write_fp8_checkpoint,
)
from workers.config import ModelConfig

CONFIG = ModelConfig(
    vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
    pad_token_id=0, eos_token_id=(1,),
)
EXPERT = "model.layers.1.mlp.experts.3.gate_proj.weight"
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def model_tensors(config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors under every official name: dense layer 0, MoE layer 1, MTP layer 2."""
    gen = torch.Generator().manual_seed(0)
    h, d, e, i = config.hidden_size, config.head_dim, config.moe_intermediate_size, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h),
                                          "model.norm.weight": (h,), "lm_head.weight": (config.vocab_size, h)}
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        p = f"model.layers.{layer}"
        shapes |= {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                   f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.q_proj.bias": (q,),
                   f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.k_proj.bias": (kv,),
                   f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.v_proj.bias": (kv,),
                   f"{p}.self_attn.o_proj.weight": (h, q)}
        if not config.is_moe_layer(layer):
            shapes |= {f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                       f"{p}.mlp.down_proj.weight": (h, i)}
            continue
        shapes[f"{p}.mlp.gate.weight"] = (config.n_routed_experts, h)
        for expert in [*(f"experts.{x}" for x in range(config.n_routed_experts)), "shared_experts"]:
            shapes |= {f"{p}.mlp.{expert}.gate_proj.weight": (e, h), f"{p}.mlp.{expert}.up_proj.weight": (e, h),
                       f"{p}.mlp.{expert}.down_proj.weight": (h, e)}
    mtp = f"model.layers.{config.mtp_layer_index}"
    shapes |= {f"{mtp}.enorm.weight": (h,), f"{mtp}.hnorm.weight": (h,), f"{mtp}.eh_proj.weight": (h, 2 * h),
               f"{mtp}.shared_head.norm.weight": (h,), f"{mtp}.shared_head.head.weight": (config.vocab_size, h),
               f"{mtp}.embed_tokens.weight": (config.vocab_size, h)}
    tensors = {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes.items()}
    for layer in config.moe_layer_indices:
        tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = torch.rand(
            config.n_routed_experts, generator=gen, dtype=torch.float32) / 7
    return tensors


def checkpoint_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def header_size(folder: Path) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
    return total


# ---- round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_is_bit_exact(tmp_path: Path, num_shards: int) -> None:
    tensors = model_tensors(CONFIG, torch.bfloat16)
    write_checkpoint(tmp_path, tensors, CONFIG, num_shards=num_shards, extra_files={"tokenizer_config.json": "{}"})
    ckpt = Checkpoint(tmp_path)
    assert ckpt.config == CONFIG
    assert ckpt.names() == sorted(tensors)
    assert ckpt.shape(EXPERT) == (16, 32) and ckpt.dtype(EXPERT) == torch.bfloat16
    assert ckpt.dtype(BIAS) == torch.float32
    loaded = ckpt.load(lambda name: True, torch.bfloat16)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [1]
    assert (tmp_path / "tokenizer_config.json").read_text() == "{}"


def test_shards_are_balanced_and_indexed(tmp_path: Path) -> None:
    tensors = model_tensors(CONFIG, torch.bfloat16)
    write_checkpoint(tmp_path, tensors, CONFIG, num_shards=3)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-00003.safetensors"))
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["weight_map"].keys() == tensors.keys()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    biggest = max(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        assert abs(shard.stat().st_size - total / 3) < biggest + header_size(tmp_path), shard.name


def test_dtype_conversion_and_fp32_bias(tmp_path: Path) -> None:
    bf16 = model_tensors(CONFIG, torch.bfloat16)
    write_checkpoint(tmp_path / "bf16", bf16, CONFIG)
    as_fp32 = Checkpoint(tmp_path / "bf16").load(lambda name: name in (EXPERT, BIAS), torch.float32)
    assert as_fp32[EXPERT].dtype == torch.float32 and torch.equal(as_fp32[EXPERT], bf16[EXPERT].float())

    fp32 = model_tensors(CONFIG, torch.float32)
    write_checkpoint(tmp_path / "fp32", fp32, CONFIG.replace(torch_dtype="float32"))
    as_bf16 = Checkpoint(tmp_path / "fp32").load(lambda name: name in (EXPERT, BIAS), torch.bfloat16)
    assert as_bf16[EXPERT].dtype == torch.bfloat16 and torch.equal(as_bf16[EXPERT], fp32[EXPERT].bfloat16())
    # The router bias is needed in fp32 whatever the model dtype (GLM45.md §6.4).
    assert as_bf16[BIAS].dtype == torch.float32 and torch.equal(as_bf16[BIAS], fp32[BIAS])


def test_predicate_load_reads_only_selected_bytes(tmp_path: Path) -> None:
    tensors = model_tensors(CONFIG, torch.float32)
    write_checkpoint(tmp_path, tensors, CONFIG.replace(torch_dtype="float32"), num_shards=4)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.bytes_read == header_size(tmp_path)
    prefix = "model.layers.1.mlp.experts.3."
    loaded = ckpt.load(lambda name: name.startswith(prefix), torch.float32)
    assert sorted(loaded) == [f"{prefix}{p}_proj.weight" for p in ("down", "gate", "up")]
    expert_bytes = sum(t.numel() * t.element_size() for t in loaded.values())
    assert ckpt.bytes_read == header_size(tmp_path) + expert_bytes
    assert ckpt.bytes_read < 0.15 * checkpoint_size(tmp_path)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, tensors[name])


def test_require_loads_exactly_the_names_and_checks_shapes(tmp_path: Path) -> None:
    tensors = model_tensors(CONFIG, torch.bfloat16)
    write_checkpoint(tmp_path, tensors, CONFIG)
    ckpt = Checkpoint(tmp_path)
    got = ckpt.require([EXPERT, BIAS], torch.bfloat16)
    assert sorted(got) == sorted([EXPERT, BIAS])
    ckpt.check_shape(EXPERT, got[EXPERT], (16, 32))

    missing = "model.layers.1.mlp.experts.99.up_proj.weight"
    with pytest.raises(CheckpointError, match=r"experts\.99\.up_proj\.weight") as err:
        ckpt.require([EXPERT, missing], torch.bfloat16)
    assert str(tmp_path) in str(err.value)

    with pytest.raises(CheckpointError) as err:
        ckpt.check_shape(EXPERT, got[EXPERT], (32, 16))
    for part in ("model.safetensors", EXPERT, "[32, 16]", "[16, 32]"):
        assert part in str(err.value)


# ---- malformed checkpoints --------------------------------------------------------------
def raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_truncated_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, model_tensors(CONFIG, torch.bfloat16), CONFIG)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '[^']+' ends at byte \d+ .*truncated"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(("header", "data", "message"), [
    (b'{"a": {"dtype": "F32", "shape": [2], ', b"", "not valid JSON"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}', bytes(8), r"tensor 'w' holds 8 bytes"),
    (b'{"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}', bytes(8), r"tensor 'w' .*unsupported dtype"),
    (b'{"w": {"dtype": "F32", "shape": [1]}}', bytes(4), r"tensor 'w' has a malformed header entry"),
])
def test_malformed_header(tmp_path: Path, header: bytes, data: bytes, message: str) -> None:
    write_checkpoint(tmp_path, {}, CONFIG)
    raw_safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: .*{message}"):
        Checkpoint(tmp_path)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {}, CONFIG)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length 1099511627776 goes beyond"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(("shard", "message"), [
    ("model-00009-of-00009.safetensors", "which does not exist"),
    ("model-00002-of-00002.safetensors", "which lacks it"),
])
def test_weight_map_to_bad_shard(tmp_path: Path, shard: str, message: str) -> None:
    write_checkpoint(tmp_path, model_tensors(CONFIG, torch.bfloat16), CONFIG, num_shards=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert index["weight_map"]["lm_head.weight"] == "model-00001-of-00002.safetensors"
    index["weight_map"]["lm_head.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    for part in ("model.safetensors.index.json", "'lm_head.weight'", shard, message):
        assert part in str(err.value)


def test_no_weights_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {}, CONFIG)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        Checkpoint(tmp_path)


def test_unknown_model_type(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {}, CONFIG)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama'"):
        Checkpoint(tmp_path)


# ---- FP8 --------------------------------------------------------------------------------
def stored(folder: Path, name: str) -> torch.Tensor:
    """A tensor exactly as stored, read with the safetensors library rather than our reader."""
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def assert_close_to_original(dequantized: torch.Tensor, original: torch.Tensor) -> None:
    # e4m3 keeps 3 mantissa bits: rounding moves a value by at most 1/16 of its row's largest magnitude.
    bound = original.float().abs().amax(dim=1, keepdim=True) / 16
    assert bool(((dequantized - original.float()).abs() <= bound).all())


def test_fp8_channel_dequantises_on_load(tmp_path: Path) -> None:
    tensors = model_tensors(CONFIG, torch.bfloat16)
    write_fp8_checkpoint(tmp_path, tensors, CONFIG, layout="channel", num_shards=2)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.config.quantization_config["quant_method"] == "compressed-tensors"
    assert ckpt.names() == sorted(tensors)  # the scales are hidden
    assert ckpt.dtype(EXPERT) == torch.float8_e4m3fn
    assert ckpt.dtype("lm_head.weight") == torch.bfloat16
    mtp_head = "model.layers.2.shared_head.head.weight"
    assert is_fp8_quantized(mtp_head) and not is_fp8_quantized("model.layers.2.eh_proj.weight")

    names = (EXPERT, mtp_head, BIAS, "model.layers.2.eh_proj.weight")
    loaded = ckpt.load(lambda name: name in names, torch.float32)
    assert sorted(loaded) == sorted(names)
    for name in (EXPERT, mtp_head):
        scale = stored(tmp_path, name + "_scale")
        assert scale.shape == (tensors[name].shape[0], 1)
        assert torch.equal(loaded[name], stored(tmp_path, name).float() * scale)
        assert_close_to_original(loaded[name], tensors[name])
    assert torch.equal(loaded["model.layers.2.eh_proj.weight"], tensors["model.layers.2.eh_proj.weight"].float())
    assert loaded[BIAS].dtype == torch.float32 and torch.equal(loaded[BIAS], tensors[BIAS])
    assert ckpt.load(lambda name: name == EXPERT, torch.bfloat16)[EXPERT].dtype == torch.bfloat16


def test_fp8_block_dequantises_ragged_edges(tmp_path: Path) -> None:
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(1)) * 3
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    write_fp8_checkpoint(tmp_path, {name: weight, BIAS: torch.zeros(8)}, CONFIG, layout="block")
    ckpt = Checkpoint(tmp_path)
    assert ckpt.config.quantization_config["weight_block_size"] == [128, 128]
    assert ckpt.names() == sorted([name, BIAS])
    loaded = ckpt.load(lambda n: n == name, torch.float32)[name]

    w_fp8, scale_inv = stored(tmp_path, name), stored(tmp_path, name + "_scale_inv")
    assert scale_inv.shape == (3, 2)
    expected = torch.empty(300, 200)
    for i in range(3):
        for j in range(2):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            expected[rows, cols] = w_fp8[rows, cols].float() * scale_inv[i, j]
    assert torch.equal(loaded, expected)
    assert_close_to_original(loaded, weight)


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_fp8_tensor_strategy(tmp_path: Path, scale_shape: tuple[int, ...]) -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    scale = (weight.abs().max() / 448).reshape(scale_shape)
    w_fp8 = (weight / scale).to(torch.float8_e4m3fn)
    config = CONFIG.replace(quantization_config=compressed_tensors_quantization_config("tensor", ignore=[]))
    write_checkpoint(tmp_path, {EXPERT: w_fp8, EXPERT + "_scale": scale}, config)
    loaded = Checkpoint(tmp_path).load(lambda name: True, torch.float32)
    assert list(loaded) == [EXPERT]
    assert torch.equal(loaded[EXPERT], w_fp8.float() * scale)


@pytest.mark.parametrize("layout", ["channel", "block"])
def test_fp8_weight_without_scale(tmp_path: Path, layout: str) -> None:
    write_fp8_checkpoint(tmp_path / "full", {EXPERT: torch.randn(16, 32)}, CONFIG, layout=layout)
    full = Checkpoint(tmp_path / "full")
    write_checkpoint(tmp_path / "broken", {EXPERT: stored(tmp_path / "full", EXPERT)}, full.config)
    ckpt = Checkpoint(tmp_path / "broken")
    suffix = "_scale" if layout == "channel" else "_scale_inv"
    with pytest.raises(CheckpointError) as err:
        ckpt.load(lambda name: True, torch.float32)
    for part in ("model.safetensors", f"'{EXPERT}'", f"'{EXPERT}{suffix}'"):
        assert part in str(err.value)


def test_fp8_scale_of_wrong_shape(tmp_path: Path) -> None:
    w_fp8, scale = quantize_fp8_channel(torch.randn(16, 32))
    config = CONFIG.replace(quantization_config=compressed_tensors_quantization_config("channel", ignore=[]))
    write_checkpoint(tmp_path, {EXPERT: w_fp8, EXPERT + "_scale": scale.T.contiguous()}, config)
    with pytest.raises(CheckpointError, match=r"scale tensor '.*_scale' has shape \[1, 16\], expected \[16, 1\]"):
        Checkpoint(tmp_path).load(lambda name: True, torch.float32)


def test_fp8_without_quantization_config(tmp_path: Path) -> None:
    w_fp8, _ = quantize_fp8_block(torch.randn(16, 32))
    write_checkpoint(tmp_path, {EXPERT: w_fp8}, CONFIG)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' is float8 .*no quantization_config"):
        Checkpoint(tmp_path).load(lambda name: True, torch.float32)


@pytest.mark.parametrize(("quant", "message"), [
    (compressed_tensors_quantization_config("group", ignore=[]), r"strategy \['group'\] is not supported"),
    ({"quant_method": "fp8"}, r"weight_block_size=None"),
    ({"quant_method": "gptq"}, r"quant_method='gptq' is not supported"),
])
def test_unsupported_quantization_config(tmp_path: Path, quant: dict, message: str) -> None:
    write_checkpoint(tmp_path, {}, CONFIG.replace(quantization_config=quant))
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{message}"):
        Checkpoint(tmp_path)
