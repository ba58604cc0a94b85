"""The dense building blocks of GLM-4.5: RMSNorm, partial NeoX RoPE, GQA attention over a paged
KV cache, and the SwiGLU MLP (dense layers and the shared expert).

The math follows GLM45.md §2 line by line; module and parameter names mirror the checkpoint
(``self_attn.q_proj``, ``q_norm`` …) so a tensor name says where it lives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import cpu_kernels
from workers.batch import ForwardBatch
from workers.config import ModelConfig


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears of the same input, stacked along the outputs.

    Each linear's parameters become views of the stacked tensors, so the model keeps one copy of
    its weights and its checkpoint names; one matmul then computes every output at once.
    """
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("fuse_linears: either every linear has a bias or none has")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None  # type: ignore[union-attr]
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row:row + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row:row + rows], requires_grad=False)
        row += rows
    return weight, bias


class RMSNorm(nn.Module):
    """``w * (x_f32 * rsqrt(mean(x_f32²) + eps)).to(input dtype)`` — cast before the weight, as HF."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts
            if self._kernel_fits(x):  # one C++ call instead of torch's half a dozen on the CPU
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + residual, self(x + residual))``, fused into one call where the C++ kernel fits."""
        if x.dtype == residual.dtype == self.weight.dtype == torch.float32 and residual.is_contiguous() \
                and self._kernel_fits(x):
            return cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)
        total = x + residual
        return total, self(total)

    def _kernel_fits(self, x: torch.Tensor) -> bool:
        return (x.is_cpu and x.shape[-1] % 8 == 0 and x.is_contiguous() and self.weight.is_cpu
                and cpu_kernels.available())


class RotaryEmbedding:
    """Partial RoPE, NeoX half-split: only the first ``rotary_dim`` channels of a head rotate."""

    def __init__(self, config: ModelConfig) -> None:
        self.rotary_dim = config.rotary_dim
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device="cpu") / self.rotary_dim
        self.inv_freq = 1.0 / (config.rope_theta ** exponents)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [T, rotary_dim] for token positions [T] (computed in fp32, cast like HF)."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim]; channels past the rotary dim pass through."""
        if x.dtype == cos.dtype == torch.float32 and x.is_cpu and cpu_kernels.available():
            return cpu_kernels.rope(x, cos, sin)  # one C++ call for the ten ops below
        rot_dim = cos.shape[-1]
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        half = rot_dim // 2
        rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        x_rot = x_rot * cos[:, None, :] + rotated_half * sin[:, None, :]
        return torch.cat((x_rot, x_pass), dim=-1)


class Attention(nn.Module):
    """GQA self-attention with optional q/k/v bias and QK-norm, reading and writing a paged KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        # Set by fuse_projections; buffers (not saved) so that ``.to()`` moves them with the model.
        self.qkv_weight: torch.Tensor | None
        self.qkv_bias: torch.Tensor | None
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_projections(self) -> None:
        """Compute q, k and v with one matmul from here on (``fuse_linears``)."""
        self.qkv_weight, self.qkv_bias = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, H] → [T, H]; k_cache/v_cache are this layer's slot tensors [Hkv, num_slots, D]."""
        num_tokens = x.shape[0]
        cos, sin = rope
        heads = self.num_heads + self.num_kv_heads  # q's heads, then k's
        if self.qkv_weight is not None:
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(num_tokens, heads + self.num_kv_heads, self.head_dim)
            qk, v = qkv[:, :heads], qkv[:, heads:]
            if self.use_qk_norm:  # before RoPE (GLM45.md §2)
                qk = torch.cat((self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])), dim=1)
        else:
            q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            if self.use_qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            qk = torch.cat((q, k), dim=1)
        qk = RotaryEmbedding.apply(qk, cos, sin)  # q and k rotate alike: one call for both
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        k_cache.index_copy_(1, batch.slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, batch.slot_mapping, v.transpose(0, 1).to(v_cache.dtype))
        out = self._attend(q, batch, k_cache, v_cache)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        """Causal attention of every sequence's new queries over its cached context.

        Context is read a whole block at a time, per KV head: the head-major cache makes each
        head's gathered context one contiguous [L, D] matrix. Decode rows (one query each) are
        batched into one padded computation per group of similar context lengths; on the CPU, when
        the C++ kernels are built (``workers.cpu_kernels``), they are read in place instead, with
        no gathered copy. Prefill chunks run one call per sequence.
        """
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        block_width = batch.block_size_tokens * self.head_dim
        k_blocks = k_cache.view(self.num_kv_heads, -1, block_width)    # [Hkv, num_blocks, bs * D]
        v_blocks = v_cache.view(self.num_kv_heads, -1, block_width)
        paged_kernel = q.device.type == "cpu" and cpu_kernels.available()
        for group in batch.decode_groups:
            if paged_kernel:  # straight from the paged cache, without a gathered copy
                cpu_kernels.paged_decode_attention(out, q, k_cache, v_cache, group.rows, group.blocks, group.lens,
                                                   batch.block_size_tokens, self.scale)
                continue
            num_seqs = group.rows.shape[0]
            keys = _gather_blocks(k_blocks, group.blocks, self.head_dim)   # [Hkv, B, L, D]
            values = _gather_blocks(v_blocks, group.blocks, self.head_dim)
            queries = q.index_select(0, group.rows)                        # [B, Hq, D]
            if q.device.type == "cpu":
                attn = self._decode_cpu(queries, keys, values, group.mask)
            else:
                attn = F.scaled_dot_product_attention(
                    queries[:, :, None, :], keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype),
                    attn_mask=group.mask[:, None, None, :], scale=self.scale, enable_gqa=True)[:, :, 0, :]
            out.index_copy_(0, group.rows, attn.reshape(num_seqs, self.num_heads, self.head_dim).to(q.dtype))
        for start, length, blocks, mask in batch.prefill_segments:
            keys = _gather_blocks(k_blocks, blocks[None], self.head_dim)[:, 0].to(q.dtype)[None]  # [1, Hkv, L, D]
            values = _gather_blocks(v_blocks, blocks[None], self.head_dim)[:, 0].to(q.dtype)[None]
            queries = q[start:start + length].transpose(0, 1)[None]    # [1, Hq, n, D]
            attn = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[start:start + length] = attn[0].transpose(0, 1)
        return out

    def _decode_cpu(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """One query per sequence, in float32 with batched matmuls over (KV head, sequence).

        queries [B, Hq, D]; keys/values [Hkv, B, L, D]; mask [B, L] → [B, Hq, D]. On the CPU this
        is about twice as fast as scaled_dot_product_attention with a padding mask.
        """
        num_kv, num_seqs, length, dim = keys.shape
        group = self.num_heads // num_kv
        q = (queries.float() * self.scale).view(num_seqs, num_kv, group, dim).transpose(0, 1)
        q = q.reshape(num_kv * num_seqs, group, dim)
        scores = torch.bmm(q, keys.float().view(num_kv * num_seqs, length, dim).transpose(1, 2))
        scores = scores.view(num_kv, num_seqs, group, length)
        scores.masked_fill_(~mask[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(num_kv * num_seqs, group, length)
        attn = torch.bmm(probs, values.float().view(num_kv * num_seqs, length, dim))
        return attn.view(num_kv, num_seqs, group, dim).transpose(0, 1)


def _gather_blocks(cache_blocks: torch.Tensor, tables: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Blocks ``tables`` [B, N] of ``cache_blocks`` [Hkv, num_blocks, bs * D] → [Hkv, B, N * bs, D]."""
    num_seqs, num_blocks = tables.shape
    gathered = cache_blocks.index_select(1, tables.reshape(-1))
    return gathered.view(cache_blocks.shape[0], num_seqs, -1, head_dim)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` — the dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by fuse_projections

    def fuse_projections(self) -> None:
        """Compute gate and up with one matmul from here on (``fuse_linears``)."""
        self.gate_up_weight = fuse_linears(self.gate_proj, self.up_proj)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
