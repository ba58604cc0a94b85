"""Checkpoint: read tensors out of a Hugging Face ``glm4_moe`` checkpoint folder.

A worker that holds a few experts must not touch the rest of a 200 GB checkpoint, so this module
parses the safetensors headers itself and reads each selected tensor's bytes with one positioned
read (never a whole shard, never an mmap); ``bytes_read`` counts what was actually read so a test
can prove it. FP8 checkpoints are dequantised on load, transparently: a caller asks for
``X.weight`` and gets a float tensor, the ``X.weight_scale`` / ``X.weight_scale_inv`` tensors
are consumed and never returned (GLM45.md §4). ``*.e_score_correction_bias`` always comes back as
float32 (GLM45.md §6.4).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.config import ConfigError, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FP32_TENSOR_SUFFIX = ".e_score_correction_bias"

# safetensors dtype name -> torch dtype; only what GLM-4.5 checkpoints (bf16 and FP8 releases) hold.
_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
}


class CheckpointError(Exception):
    """A checkpoint that cannot be read as asked; the message names the file and the tensor."""


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor's bytes live: ``nbytes`` bytes at absolute ``offset`` in ``file``."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class _Fp8Scheme:
    """How a float8 ``X.weight`` is scaled: the scale tensor's suffix and its layout."""

    scale_suffix: str  # appended to the weight's name: "_scale" or "_scale_inv"
    strategy: str  # "channel", "tensor" or "block"
    block: tuple[int, int] | None = None


class Checkpoint:
    """A checkpoint folder: ``config.json`` plus one ``model.safetensors`` or indexed shards.

    Opening reads only the config and the safetensors headers. ``names()`` lists the tensors a
    caller can load; FP8 scale tensors are hidden behind the weights they scale.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.bytes_read = 0
        config_path = self.folder / "config.json"
        try:
            self.config = ModelConfig.from_file(config_path)
        except ConfigError as exc:
            message = str(exc) if str(config_path) in str(exc) else f"{config_path}: {exc}"
            raise CheckpointError(message) from exc
        self._fp8 = _fp8_scheme(self.config.quantization_config, config_path)
        self._tensors = self._read_layout()
        suffix = self._fp8.scale_suffix if self._fp8 else None
        self._scales = {
            name for name in self._tensors
            if suffix and name.endswith(suffix) and name.removesuffix(suffix) in self._tensors
        }

    # ---- layout ---------------------------------------------------------------------------
    def _read_layout(self) -> dict[str, _TensorInfo]:
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        if index.is_file():
            return self._read_index(index)
        if single.is_file():
            return self._read_header(single)
        raise CheckpointError(f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def _read_index(self, index: Path) -> dict[str, _TensorInfo]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({exc!r})") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' is not an object")
        headers: dict[str, dict[str, _TensorInfo]] = {}
        tensors: dict[str, _TensorInfo] = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                path = self.folder / shard
                if not path.is_file():
                    raise CheckpointError(f"{index}: tensor {name!r} maps to shard {shard!r}, which does not exist")
                headers[shard] = self._read_header(path)
            if name not in headers[shard]:
                raise CheckpointError(f"{index}: tensor {name!r} maps to shard {shard!r}, which lacks it")
            tensors[name] = headers[shard][name]
        return tensors

    def _read_header(self, path: Path) -> dict[str, _TensorInfo]:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: {file_size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise CheckpointError(f"{path}: header length {header_len} goes beyond the file ({file_size} bytes)")
            raw = f.read(header_len)
        self.bytes_read += 8 + header_len
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + header_len
        tensors = {}
        for name, entry in header.items():
            if name != "__metadata__":
                tensors[name] = _tensor_info(path, name, entry, data_start, file_size)
        return tensors

    # ---- queries --------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Loadable tensor names, sorted; FP8 scale tensors are not listed."""
        return sorted(name for name in self._tensors if name not in self._scales)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (``torch.float8_e4m3fn`` for a quantised weight, which loads as float)."""
        return _DTYPES[self._info(name).dtype]

    def file_of(self, name: str) -> Path:
        return self._info(name).file

    def _info(self, name: str) -> _TensorInfo:
        if name in self._scales or name not in self._tensors:
            raise CheckpointError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        return self._tensors[name]

    # ---- loading --------------------------------------------------------------------------
    def load(self, predicate: Callable[[str], bool], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Load every tensor whose name ``predicate`` accepts, converted to ``dtype``."""
        return self._load([name for name in self.names() if predicate(name)], dtype)

    def require(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Load exactly ``names``; a name the checkpoint lacks is a CheckpointError naming it."""
        wanted = list(names)
        for name in wanted:
            self._info(name)
        return self._load(wanted, dtype)

    def check_shape(self, name: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
        """Raise CheckpointError naming the tensor and its file unless ``tensor`` has shape ``expected``."""
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(
                f"{self.file_of(name)}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(expected)}"
            )

    def _load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        scales = {name: self._scale_name(name) for name in names if self._tensors[name].dtype == "F8_E4M3"}
        raw = self._read([*names, *scales.values()])
        out = {}
        for name in names:
            tensor = raw[name]
            if name in scales:
                tensor = self._dequantize(name, tensor, raw[scales[name]])
            out[name] = tensor.to(torch.float32 if name.endswith(FP32_TENSOR_SUFFIX) else dtype)
        return out

    def _scale_name(self, name: str) -> str:
        info = self._tensors[name]
        if self._fp8 is None:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} is float8 but {self.folder / 'config.json'} has no quantization_config"
            )
        scale = name + self._fp8.scale_suffix
        if scale not in self._tensors:
            raise CheckpointError(f"{info.file}: float8 tensor {name!r} has no scale tensor {scale!r}")
        return scale

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors' bytes, one positioned read each, grouped by file in offset order."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._tensors[name].file, []).append(name)
        out = {}
        for path, group in by_file.items():
            fd = os.open(path, os.O_RDONLY)
            try:
                for name in sorted(group, key=lambda n: self._tensors[n].offset):
                    out[name] = self._read_tensor(fd, name)
            finally:
                os.close(fd)
        return out

    def _read_tensor(self, fd: int, name: str) -> torch.Tensor:
        info = self._tensors[name]
        torch_dtype = _DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype)
        buffer = bytearray(info.nbytes)
        view = memoryview(buffer)
        done = 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got == 0:
                raise CheckpointError(f"{info.file}: tensor {name!r} is cut short ({done} of {info.nbytes} bytes)")
            done += got
        self.bytes_read += info.nbytes
        return torch.frombuffer(buffer, dtype=torch.uint8).view(torch_dtype).reshape(info.shape)

    def _dequantize(self, name: str, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``W = W_fp8 * scale``, the scale broadcast per tensor, per output channel or per block."""
        scheme = self._fp8
        if scheme is None or weight.dim() != 2:
            raise CheckpointError(f"{self.file_of(name)}: float8 tensor {name!r} of shape {list(weight.shape)} "
                                  "is not a 2-D weight of a quantised checkpoint")
        scale_name = name + scheme.scale_suffix
        out_dim, in_dim = weight.shape
        if scheme.block is not None:
            rows, cols = scheme.block
            blocks = (math.ceil(out_dim / rows), math.ceil(in_dim / cols))
            expected, valid = str(list(blocks)), tuple(scale.shape) == blocks
        elif scheme.strategy == "channel":
            expected, valid = f"[{out_dim}, 1]", tuple(scale.shape) == (out_dim, 1)
        else:
            expected, valid = "[] or [1]", tuple(scale.shape) in ((), (1,))
        if not valid:
            raise CheckpointError(
                f"{self._tensors[scale_name].file}: scale tensor {scale_name!r} has shape {list(scale.shape)}, "
                f"expected {expected} for {scheme.strategy} scaling of {name!r} {list(weight.shape)}"
            )
        scale = scale.float()
        if scheme.block is not None:
            scale = scale.repeat_interleave(rows, dim=0)[:out_dim].repeat_interleave(cols, dim=1)[:, :in_dim]
        return weight.float() * scale


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, file_size: int) -> _TensorInfo:
    """Validate one header entry against the file it lives in."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from exc
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} "
                              f"(supported: {', '.join(_DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {[begin, end]!r}")
    if data_start + end > file_size:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                              f"{file_size} bytes (truncated file?)")
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} holds {end - begin} bytes but {dtype}{shape} "
                              f"needs {expected}")
    return _TensorInfo(path, dtype, tuple(shape), data_start + begin, end - begin)


def _fp8_scheme(quant: dict[str, Any] | None, config_path: Path) -> _Fp8Scheme | None:
    """Read config.json's ``quantization_config``; None for an unquantised checkpoint."""
    if quant is None:
        return None
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        groups = quant.get("config_groups") or {}
        if not groups:
            raise CheckpointError(f"{config_path}: compressed-tensors quantization_config has no config_groups")
        strategies = set()
        for group_name, group in groups.items():
            weights = group.get("weights") or {}
            if weights.get("type", "float") != "float" or weights.get("num_bits", 8) != 8:
                raise CheckpointError(f"{config_path}: quantization_config.config_groups.{group_name}.weights "
                                      f"{weights!r}: only 8-bit float weights are supported")
            strategies.add(weights.get("strategy"))
        if len(strategies) != 1 or not strategies <= {"channel", "tensor"}:
            raise CheckpointError(f"{config_path}: quantization_config weight strategy {sorted(map(str, strategies))}"
                                  " is not supported (supported: channel, tensor)")
        return _Fp8Scheme("_scale", strategies.pop())
    if method == "fp8":
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{config_path}: quantization_config.weight_block_size={block!r}: "
                                  "fp8 checkpoints must give a [rows, cols] block size")
        return _Fp8Scheme("_scale_inv", "block", (block[0], block[1]))
    raise CheckpointError(f"{config_path}: quantization_config.quant_method={method!r} is not supported "
                          "(supported: compressed-tensors, fp8)")
