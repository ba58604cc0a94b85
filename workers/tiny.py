"""``moecluster make-tiny``: small random checkpoints of the real GLM-4.5 architecture.

The tensors carry the official names and shapes (GLM45.md §4), the MTP layer included with its
embed/head copies, and the folder gets a byte-level BPE ``tokenizer.json`` with GLM-4.5's special
tokens and chat template. Everything is a function of (preset, seed), so tests can make the same
checkpoint twice. Presets cover the architecture switches the parity tests must exercise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from workers.checkpoint_writer import write_checkpoint
from workers.config import ModelConfig
from workers.tiny_tokenizer import build_tokenizer_files, special_token_ids

TINY_VOCAB_SIZE = 512

_BASE = ModelConfig(
    vocab_size=TINY_VOCAB_SIZE, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5, rope_theta=1_000_000.0,
    max_position_embeddings=2048, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16,
    n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1, routed_scaling_factor=1.0,
    first_k_dense_replace=1, use_qk_norm=False, attention_bias=True, torch_dtype="float32",
)

# name -> (config changes, number of safetensors shards)
PRESETS: dict[str, tuple[dict, int]] = {
    "air": ({}, 1),                                                        # GLM-4.5-Air switches
    "glm45": ({"use_qk_norm": True, "routed_scaling_factor": 2.5}, 1),     # GLM-4.5 switches
    "nobias": ({"attention_bias": False}, 1),
    "grouped": ({"n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5}, 1),
    "sharded": ({"use_qk_norm": True, "first_k_dense_replace": 2, "num_hidden_layers": 4}, 3),
    # The official layer count, so transformers' MTP patterns (layers 46/92) apply as to the real one.
    "air46": ({"num_hidden_layers": 46, "n_routed_experts": 8, "num_experts_per_tok": 2}, 2),
    # Larger, for benchmarks: enough compute per step that overheads do not hide it.
    "bench": ({"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
               "num_hidden_layers": 4, "intermediate_size": 1024, "moe_intermediate_size": 256,
               "n_routed_experts": 64, "num_experts_per_tok": 8}, 1),
}


def tiny_config(preset: str = "air") -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r} (choose from {', '.join(PRESETS)})")
    ids = special_token_ids(_BASE.vocab_size)
    eos = (ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"])
    return _BASE.replace(pad_token_id=ids["<|endoftext|>"], eos_token_id=eos, **PRESETS[preset][0])


def random_tensors(config: ModelConfig, seed: int, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Random weights under the official tensor names (float32), MTP layer included."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm(size: int) -> torch.Tensor:
        return 1.0 + rand(size, scale=0.1)

    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * d, config.num_key_value_heads * d
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(config.vocab_size, h, scale=1.0)}

    def swiglu(prefix: str, inter: int) -> None:
        tensors[f"{prefix}.gate_proj.weight"] = rand(inter, h)
        tensors[f"{prefix}.up_proj.weight"] = rand(inter, h)
        tensors[f"{prefix}.down_proj.weight"] = rand(h, inter)

    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = norm(h)
        tensors[f"{p}.post_attention_layernorm.weight"] = norm(h)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            tensors[f"{p}.self_attn.{name}.weight"] = rand(out, h)
            if config.attention_bias:
                tensors[f"{p}.self_attn.{name}.bias"] = rand(out)
        tensors[f"{p}.self_attn.o_proj.weight"] = rand(h, q_out)
        if config.use_qk_norm:
            tensors[f"{p}.self_attn.q_norm.weight"] = norm(d)
            tensors[f"{p}.self_attn.k_norm.weight"] = norm(d)
        if config.is_moe_layer(layer):
            tensors[f"{p}.mlp.gate.weight"] = rand(config.n_routed_experts, h, scale=0.3)
            tensors[f"{p}.mlp.gate.e_score_correction_bias"] = rand(config.n_routed_experts, scale=0.05)
            for e in range(config.n_routed_experts):
                swiglu(f"{p}.mlp.experts.{e}", config.moe_intermediate_size)
            swiglu(f"{p}.mlp.shared_experts", config.moe_intermediate_size * config.n_shared_experts)
        else:
            swiglu(f"{p}.mlp", config.intermediate_size)
    tensors["model.norm.weight"] = norm(h)
    tensors["lm_head.weight"] = rand(config.vocab_size, h, scale=0.3)
    if config.num_nextn_predict_layers:
        p = f"model.layers.{config.mtp_layer_index}"
        tensors[f"{p}.enorm.weight"] = norm(h)
        tensors[f"{p}.hnorm.weight"] = norm(h)
        tensors[f"{p}.eh_proj.weight"] = rand(h, 2 * h)
        tensors[f"{p}.shared_head.norm.weight"] = norm(h)
        tensors[f"{p}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        tensors[f"{p}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    return tensors


def make_tiny(out_dir: str | Path, seed: int = 0, preset: str = "air",
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny checkpoint folder; returns its path."""
    config = tiny_config(preset)
    if dtype != torch.float32:
        config = config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    tensors = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype))
               for k, v in random_tensors(config, seed).items()}
    out = Path(out_dir)
    write_checkpoint(out, tensors, config, num_shards=PRESETS[preset][1],
                     extra_files=build_tokenizer_files(config.vocab_size))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moecluster make-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="air")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    path = make_tiny(args.out_dir, args.seed, args.preset, getattr(torch, args.dtype))
    print(json.dumps({"path": str(path), "preset": args.preset, "seed": args.seed}))
