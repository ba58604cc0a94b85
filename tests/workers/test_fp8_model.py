"""FP8 checkpoints (compressed-tensors per channel, and 128x128 block scales) load dequantised."""

from __future__ import annotations

import pytest
import torch

from workers.batch import SequenceChunk, build_batch
from workers.checkpoint import Checkpoint
from workers.checkpoint_writer import write_fp8_checkpoint
from workers.generate import load_model
from workers.kv_cache import PagedKVCache
from workers.tiny import random_tensors, tiny_config


def _logits(model, prompt):
    kv = PagedKVCache(model.config, num_blocks=8, block_size_tokens=8)
    batch = build_batch([SequenceChunk(prompt, 0, kv.allocator.allocate(5), num_logits=len(prompt))], 8)
    return model.forward(batch, kv).logits


@pytest.mark.parametrize("layout", ["channel", "block"])
def test_fp8_checkpoint_loads_close_to_the_original(tmp_path, tiny_checkpoint, layout):
    config = tiny_config("glm45")
    folder = write_fp8_checkpoint(tmp_path / layout, random_tensors(config, seed=0), config, layout)
    ckpt = Checkpoint(folder)
    assert ckpt.dtype("model.layers.1.mlp.experts.0.up_proj.weight") == torch.float8_e4m3fn
    fp8 = load_model(folder)
    ref = load_model(tiny_checkpoint("glm45"))
    prompt = list(range(3, 40))
    got, want = _logits(fp8, prompt), _logits(ref, prompt)
    assert not torch.equal(got, want)                    # it really was quantised
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    # Tiny tensors make one 128x128 block per weight (a coarse per-tensor scale), so allow a few
    # tokens whose expert choice flips; on average the outputs must agree closely.
    assert cos.mean() > 0.99 and cos.min() > 0.95, cos
