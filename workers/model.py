"""Glm4MoeForCausalLM for inference: decoder layers, final norm, LM head and the MTP layer.

Parameter names equal checkpoint names (``model.layers.{i}...``, ``lm_head.weight``); the MTP
layer sits at ``model.layers.{num_hidden_layers}`` exactly as in the official checkpoints, and
the main forward runs only the first ``num_hidden_layers``. Routed experts are not parameters:
each MoE block calls the expert backend given to ``set_expert_backend``.

Two forwards serve the engine: ``forward`` over a flat ForwardBatch (many sequences, prefill
and decode mixed) returning the normed hidden states and the logits of the rows asked for, and
``mtp_forward`` from (main hidden state, next token) to draft logits (GLM45.md §3.2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from workers.batch import ForwardBatch
from workers.config import ModelConfig
from workers.experts import EXPERT_TENSOR, ExpertBackend
from workers.kv_cache import PagedKVCache
from workers.layers import MLP, Attention, RMSNorm, RotaryEmbedding
from workers.moe import MoE

# The MTP layer's copies of the embedding and head: GLM-4.6+ drop them; they equal the main
# weights, so the model always uses ``model.embed_tokens`` and ``lm_head`` (as SGLang and HF5).
_T = TypeVar("_T")

MTP_SHARED_COPY = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$")


def run_to_end(stages: Generator[None, None, _T]) -> _T:
    """Run a staged computation (``DecoderLayer.stages``) without pausing; its result."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + Attn(norm(x))`` then ``x + FFN(norm(x))``."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_index):
            self.mlp: nn.Module = MoE(config, layer_index)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor],
                kv: PagedKVCache) -> torch.Tensor:
        return run_to_end(self.stages(x, batch, rope, kv))

    def stages(self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor],
               kv: PagedKVCache) -> Generator[None, None, torch.Tensor]:
        """The same computation as ``forward``, pausing once while the routed experts are away."""
        attn = self.self_attn(self.input_layernorm(x), batch, rope, *kv.layer(self.layer_index))
        x, normed = self.post_attention_layernorm.add_forward(attn, x)
        if not isinstance(self.mlp, MoE):
            return x + self.mlp(normed)
        pending, shared = self.mlp.start(normed)
        yield  # another micro-batch runs its attention while these tokens' experts compute
        return x + MoE.finish(normed, pending, shared)


class SharedHead(nn.Module):
    """``shared_head``: the MTP branch's final norm (its ``head`` is the main lm_head)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MtpLayer(DecoderLayer):
    """The next-token-prediction layer: ``enorm``, ``hnorm``, ``eh_proj``, an MoE decoder block, ``shared_head``."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(config)


class Glm4MoeBackbone(nn.Module):
    """``model.*``: embeddings, decoder layers (+ the MTP layer last), final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers: list[nn.Module] = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        if config.num_nextn_predict_layers:
            layers.append(MtpLayer(config, config.mtp_layer_index))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ForwardOutput:
    hidden_states: torch.Tensor  # [T, H] after the final norm (the MTP's input)
    logits: torch.Tensor         # [N, V] for batch.logits_indices


class Glm4MoeForCausalLM(nn.Module):
    """The GLM-4.5 model without its routed experts (they sit behind an ExpertBackend)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4MoeBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: dict[str, torch.Tensor],
                     device: torch.device | str = "cpu") -> Glm4MoeForCausalLM:
        """Build on the meta device and adopt the loaded tensors (no second copy in memory)."""
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        missing = [name for name in expected if name not in tensors]
        if missing:
            raise KeyError(f"missing tensors for the attention part: {missing[:5]}{' …' if len(missing) > 5 else ''}")
        for name, meta in expected.items():
            if tuple(tensors[name].shape) != tuple(meta.shape):
                raise ValueError(f"tensor {name}: shape {tuple(tensors[name].shape)}, expected {tuple(meta.shape)}")
        model.load_state_dict({k: tensors[k] for k in expected}, assign=True, strict=True)
        model = model.to(device).eval()
        model.fuse_projections()  # on the final device: the checkpoint-named parameters become views
        return model

    def fuse_projections(self) -> None:
        """q/k/v of every attention, gate/up of every SwiGLU: one matmul each (``layers.fuse_linears``)."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.fuse_projections()

    @staticmethod
    def owns_tensor(config: ModelConfig) -> Callable[[str], bool]:
        """Predicate for the checkpoint tensors of the attention part (everything but routed experts)."""
        last = config.num_hidden_layers + config.num_nextn_predict_layers

        def predicate(name: str) -> bool:
            if EXPERT_TENSOR.match(name) or MTP_SHARED_COPY.match(name):
                return False
            match = re.match(r"^model\.layers\.(\d+)\.", name)
            return match is None or int(match[1]) < last

        return predicate

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        for module in self.modules():
            if isinstance(module, MoE):
                module.experts = backend

    @property
    def mtp(self) -> MtpLayer | None:
        return self.model.layers[-1] if self.config.num_nextn_predict_layers else None  # type: ignore[return-value]

    # ---- forwards --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> ForwardOutput:
        return run_to_end(self._stages(batch, kv))

    @torch.inference_mode()
    def forward_overlapped(self, batches: list[ForwardBatch], kv: PagedKVCache) -> list[ForwardOutput]:
        """``forward`` of several micro-batches, interleaved layer by layer (ping-pong).

        Each micro-batch runs until its MoE layer has sent its tokens to the expert backend, then
        the next one runs; so while one micro-batch's routed experts compute elsewhere, this
        worker computes another's attention. Every row gets exactly what ``forward`` gives it in
        its own micro-batch. With an in-process backend it only reorders work.
        """
        runs = [self._stages(batch, kv) for batch in batches]
        outputs: list[ForwardOutput | None] = [None] * len(runs)
        active = list(range(len(runs)))
        while active:
            for i in list(active):
                try:
                    next(runs[i])
                except StopIteration as done:
                    outputs[i] = done.value
                    active.remove(i)
        return outputs  # type: ignore[return-value]

    def _stages(self, batch: ForwardBatch, kv: PagedKVCache) -> Generator[None, None, ForwardOutput]:
        x = self.model.embed_tokens(batch.token_ids)
        rope = self.rotary.cos_sin(batch.positions, x.dtype)
        for layer in self.model.layers[: self.config.num_hidden_layers]:
            x = yield from layer.stages(x, batch, rope, kv)
        hidden = self.model.norm(x)
        return ForwardOutput(hidden, self.lm_head(hidden[batch.logits_indices]))

    @torch.inference_mode()
    def mtp_forward(self, hidden_states: torch.Tensor, next_token_ids: torch.Tensor, batch: ForwardBatch,
                    kv: PagedKVCache) -> ForwardOutput:
        """One MTP step: for each row i, (h_i after model.norm, t_{i+1}) → draft logits for i+2.

        ``batch`` carries the rows' positions and KV slots (the MTP layer has its own cache
        layer); ``next_token_ids`` replaces ``batch.token_ids``. Returns the MTP hidden state
        after ``shared_head.norm`` (what the next chained step takes, as SGLang and HF5) and the
        draft logits of ``batch.logits_indices``.
        """
        mtp = self.mtp
        if mtp is None:
            raise RuntimeError("this checkpoint has no MTP layer (num_nextn_predict_layers=0)")
        embedded = self.model.embed_tokens(next_token_ids)
        u = mtp.eh_proj(torch.cat((mtp.enorm(embedded), mtp.hnorm(hidden_states)), dim=-1))
        rope = self.rotary.cos_sin(batch.positions, u.dtype)
        y = DecoderLayer.forward(mtp, u, batch, rope, kv)
        z = mtp.shared_head.norm(y)
        return ForwardOutput(z, self.lm_head(z[batch.logits_indices]))
