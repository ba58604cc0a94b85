"""ModelConfig: the GLM-4.5 architecture read from a checkpoint's ``config.json``.

Every field that changes the math is explicit here (GLM45.md §1); values are validated in one
place with errors that name the field. Presets of the published GLM-4.5-Air and GLM-4.5 configs
live beside it with parameter counts computed from the shapes, for capacity planning.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("glm4_moe",)


class ConfigError(ValueError):
    """A config.json that does not describe a model this project can run."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a ``glm4_moe`` checkpoint (names follow config.json)."""

    vocab_size: int = 151552
    hidden_size: int = 4096
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 131072
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    use_qk_norm: bool = False
    attention_bias: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    pad_token_id: int | None = 151329
    eos_token_id: tuple[int, ...] = (151329, 151336, 151338)
    torch_dtype: str = "bfloat16"
    model_type: str = "glm4_moe"
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field {name!r}={getattr(self, name)!r}: {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config field 'model_type'={self.model_type!r}: unsupported model type "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                     "max_position_embeddings"):
            need(getattr(self, name) > 0, name, "must be positive")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             "must divide num_attention_heads")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor", "must be in (0, 1]")
        need(self.rotary_dim % 2 == 0, "partial_rotary_factor", "rotary dim must be even")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             "cannot exceed n_routed_experts")
        need(self.n_routed_experts % self.n_group == 0, "n_group", "must divide n_routed_experts")
        need(self.topk_group <= self.n_group, "topk_group", "cannot exceed n_group")
        need(self.hidden_act == "silu", "hidden_act", "only silu (SwiGLU) is supported")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             "must be within [0, num_hidden_layers]")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "must be 0 or 1")
        need(self.torch_dtype in ("bfloat16", "float16", "float32"), "torch_dtype",
             "must be bfloat16, float16 or float32")

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def mtp_layer_index(self) -> int:
        """Checkpoint layer index of the MTP layer (``model.layers.N``)."""
        return self.num_hidden_layers

    def is_moe_layer(self, layer_index: int) -> bool:
        """True for MoE decoder layers; the MTP layer is always MoE (GLM45.md §3.1)."""
        return layer_index >= self.first_k_dense_replace

    @property
    def moe_layer_indices(self) -> list[int]:
        """Every layer index holding routed experts, the MTP layer included when present."""
        last = self.num_hidden_layers + self.num_nextn_predict_layers
        return [i for i in range(last) if self.is_moe_layer(i)]

    def torch_dtype_as_torch(self) -> torch.dtype:
        """The checkpoint's storage dtype as a torch dtype."""
        return getattr(torch, self.torch_dtype)

    # ---- IO -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        values = dict(raw)
        if "model_type" not in values:
            raise ConfigError(f"{source}: missing 'model_type'")
        # transformers 5.x folds rope settings into rope_parameters; accept both spellings.
        rope = values.get("rope_parameters") or {}
        values.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        values.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
        scaling = values.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            raise ConfigError(f"{source}: config field 'rope_scaling'={scaling!r}: only default RoPE is supported")
        for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
            if name not in values:
                raise ConfigError(f"{source}: missing config field {name!r}")
        if values.get("head_dim") is None:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        if "dtype" in values and "torch_dtype" not in values:
            values["torch_dtype"] = values["dtype"]
        eos = values.get("eos_token_id")
        if isinstance(eos, int):
            values["eos_token_id"] = (eos,)
        elif eos is None:
            values["eos_token_id"] = ()
        else:
            values["eos_token_id"] = tuple(eos)
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no config.json") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json form, in the official layout (``architectures`` included)."""
        out: dict[str, Any] = {"architectures": ["Glm4MoeForCausalLM"]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(rope_scaling=None, attention_dropout=0.0, initializer_range=0.02, use_cache=True)
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- capacity planning ----------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts computed from the shapes (the MTP layer reported apart)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_attention_heads * d + 2 * h * self.num_key_value_heads * d
        attn += self.num_attention_heads * d * h
        if self.attention_bias:
            attn += (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        if self.use_qk_norm:
            attn += 2 * d
        norms = 2 * h
        dense_mlp = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        shared = expert * self.n_shared_experts
        gate = self.n_routed_experts * h + self.n_routed_experts
        n_moe = self.num_hidden_layers - self.first_k_dense_replace
        moe_layer_total = attn + norms + gate + shared + self.n_routed_experts * expert
        moe_layer_active = attn + norms + gate + shared + self.num_experts_per_tok * expert
        dense_layer = attn + norms + dense_mlp
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total = embed + head + h + self.first_k_dense_replace * dense_layer + n_moe * moe_layer_total
        active = embed + head + h + self.first_k_dense_replace * dense_layer + n_moe * moe_layer_active
        mtp = 0
        if self.num_nextn_predict_layers:
            # enorm, hnorm, eh_proj, shared_head.norm, the MoE decoder layer, and the embed/head copies.
            mtp = 3 * h + 2 * h * h + moe_layer_total + 2 * self.vocab_size * h
        return {"total": total, "active": active, "active_non_embedding": active - embed - head, "mtp": mtp,
                "routed_experts": n_moe * self.n_routed_experts * expert}


PRESETS: dict[str, ModelConfig] = {
    "glm-4.5-air": ModelConfig(),
    "glm-4.5": ModelConfig(
        hidden_size=5120, num_hidden_layers=92, intermediate_size=12288, moe_intermediate_size=1536,
        n_routed_experts=160, routed_scaling_factor=2.5, first_k_dense_replace=3, use_qk_norm=True,
    ),
}
