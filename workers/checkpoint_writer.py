"""Write ``glm4_moe`` checkpoints in the official Hugging Face layout (GLM45.md §4).

Tests and tools build small checkpoints with this: ``config.json``, ``generation_config.json``
and either one ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards with a
``model.safetensors.index.json``. The FP8 helpers produce the two quantised layouts the reader
dequantises: compressed-tensors per-channel scales (the official GLM-4.5-FP8 releases) and
DeepSeek-style 128x128 block scales.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from workers.config import ModelConfig

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max

# Linear weights the official GLM-4.5-FP8 releases quantise: every *_proj except the MTP eh_proj,
# plus the MTP shared_head.head; lm_head, embeddings, norms and the router stay bf16 (GLM45.md §4).
_FP8_WEIGHT = re.compile(r"(?<!\.eh)_proj\.weight$|\.shared_head\.head\.weight$")


def write_checkpoint(
    folder: str | Path,
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    num_shards: int = 1,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (names stored exactly as given) and ``config`` to ``folder``; return it.

    Shards are contiguous runs of the tensors in the dict's order, cut so each holds about
    ``total / num_shards`` bytes and none is empty. ``extra_files`` maps file names to text
    (``tokenizer_config.json`` and the like).
    """
    if not 1 <= num_shards <= max(len(tensors), 1):
        raise ValueError(f"num_shards={num_shards}: must be in [1, number of tensors={len(tensors)}]")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    generation = {"eos_token_id": list(config.eos_token_id), "pad_token_id": config.pad_token_id, "temperature": 1.0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)

    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    if num_shards == 1:
        save_file(contiguous, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shard_of = _split(contiguous, num_shards)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: t for name, t in contiguous.items() if shard_of[name] == shard}
        save_file(part, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total_size = sum(t.numel() * t.element_size() for t in contiguous.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _split(tensors: dict[str, torch.Tensor], num_shards: int) -> dict[str, int]:
    """Shard index per tensor: a tensor goes to the shard its first byte falls in, kept non-empty."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shard_of: dict[str, int] = {}
    start, previous = 0, 0
    for i, (name, tensor) in enumerate(tensors.items()):
        by_bytes = start * num_shards // total if total else 0
        at_least = max(previous, num_shards - (len(tensors) - i))  # leave one tensor for each later shard
        at_most = previous + 1 if i else 0  # no shard skipped, the first tensor in shard 0
        previous = min(max(by_bytes, at_least), at_most)
        shard_of[name] = previous
        start += tensor.numel() * tensor.element_size()
    return shard_of


# ---- FP8 variants -------------------------------------------------------------------------
def quantize_fp8_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel float8_e4m3fn: ``weight ~= w_fp8.float() * scale`` with scale [out, 1] fp32."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_block(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled float8_e4m3fn: one fp32 scale per ``block`` x ``block`` tile, edges included.

    Returns ``(w_fp8, scale_inv)`` with scale_inv [ceil(out/block), ceil(in/block)] and
    ``weight ~= w_fp8.float() * scale_inv`` tile by tile (DeepSeek's naming; it multiplies).
    """
    w = weight.float()
    out_dim, in_dim = w.shape
    rows, cols = math.ceil(out_dim / block), math.ceil(in_dim / block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out_dim, :in_dim] = w
    tiles = padded.view(rows, block, cols, block)
    scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:out_dim, :in_dim].contiguous(), scale_inv


def compressed_tensors_quantization_config(strategy: str, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of a compressed-tensors FP8 checkpoint (weights by ``strategy``)."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token",
                   "group_size": None, "block_structure": None, "actorder": None, "observer": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": activations, "output_activations": None}},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def block_fp8_quantization_config(block: int = 128) -> dict[str, Any]:
    """The ``quantization_config`` of a DeepSeek-style block-scaled FP8 checkpoint."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}


def is_fp8_quantized(name: str) -> bool:
    """Whether the official FP8 releases store tensor ``name`` in float8 (GLM45.md §4)."""
    return _FP8_WEIGHT.search(name) is not None


def write_fp8_checkpoint(
    folder: str | Path,
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    layout: Literal["channel", "block"],
    num_shards: int = 1,
) -> Path:
    """Write an FP8 variant of a checkpoint: the tensors the official releases quantise become float8.

    ``layout="channel"`` writes ``X.weight_scale`` [out, 1] with a compressed-tensors config;
    ``layout="block"`` writes ``X.weight_scale_inv`` per 128x128 tile with a ``quant_method: fp8`` config.
    """
    out: dict[str, torch.Tensor] = {}
    ignore = []
    for name, tensor in tensors.items():
        if not is_fp8_quantized(name):
            out[name] = tensor
            if name.endswith(".weight"):
                ignore.append(name.removesuffix(".weight"))
        elif layout == "channel":
            out[name], out[name + "_scale"] = quantize_fp8_channel(tensor)
        else:
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(tensor)
    quant = (compressed_tensors_quantization_config("channel", ignore) if layout == "channel"
             else block_fp8_quantization_config())
    return write_checkpoint(folder, out, config.replace(quantization_config=quant), num_shards)
