"""Parity of the serving model with transformers' Glm4MoeForCausalLM on tiny random checkpoints.

Both sides load the same folder written by ``make-tiny``: ours through workers.checkpoint, the
reference through ``from_pretrained``. Float32 throughout; logits must agree within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Glm4MoeForCausalLM as HFGlm4Moe
from transformers.cache_utils import DynamicCache

from workers.batch import SequenceChunk, build_batch
from workers.generate import generate, load_model
from workers.kv_cache import PagedKVCache

PRESETS = ["air", "glm45", "nobias", "grouped", "sharded"]
TOLERANCE = 1e-4
NEW_TOKENS = 32


def _prompts(vocab: int, lengths: tuple[int, ...] = (5, 17, 1, 33), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _hf(folder) -> HFGlm4Moe:
    return HFGlm4Moe.from_pretrained(folder, dtype=torch.float32).eval()


@torch.inference_mode()
def _hf_greedy(hf: HFGlm4Moe, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Step-by-step greedy decode with the reference's own KV cache; logits of every step."""
    cache = DynamicCache(config=hf.config)
    ids = torch.tensor([prompt])
    tokens, logits = [], []
    for _ in range(steps):
        out = hf(ids, past_key_values=cache, use_cache=True)
        step_logits = out.logits[0, -1]
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, logits


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_logits_of_a_mixed_length_batch_match_reference(tiny_checkpoint, preset):
    folder = tiny_checkpoint(preset)
    ours, hf = load_model(folder), _hf(folder)
    prompts = _prompts(ours.config.vocab_size)
    kv = PagedKVCache(ours.config, num_blocks=64, block_size_tokens=4)
    chunks = [SequenceChunk(p, 0, kv.allocator.allocate(9), num_logits=len(p)) for p in prompts]
    logits = ours.forward(build_batch(chunks, 4), kv).logits
    row = 0
    with torch.inference_mode():
        for p in prompts:
            ref = hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[row:row + len(p)], ref, atol=TOLERANCE, rtol=0)
            row += len(p)


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_decode_with_kv_cache_matches_reference(tiny_checkpoint, preset):
    folder = tiny_checkpoint(preset)
    ours, hf = load_model(folder), _hf(folder)
    prompts = _prompts(ours.config.vocab_size, seed=2)
    result = generate(ours, prompts, NEW_TOKENS, keep_logits=True, block_size_tokens=8)
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = _hf_greedy(hf, prompt, NEW_TOKENS)
        assert result.token_ids[i] == ref_tokens, f"prompt {i} diverged"
        for step, (a, b) in enumerate(zip(result.logits[i], ref_logits, strict=True)):
            assert (a - b).abs().max() <= TOLERANCE, f"prompt {i} step {step}"


def test_hf_generate_agrees_with_ours(tiny_checkpoint):
    folder = tiny_checkpoint("glm45")
    ours, hf = load_model(folder), _hf(folder)
    prompts = _prompts(ours.config.vocab_size, lengths=(7, 12), seed=3)
    result = generate(ours, prompts, NEW_TOKENS)
    for prompt, tokens in zip(prompts, result.token_ids, strict=True):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False)
        assert out[0, len(prompt):].tolist() == tokens


def test_chunked_prefill_and_mixed_steps_match_one_shot_prefill(tiny_checkpoint):
    """A prompt prefilled in chunks while another sequence decodes gives the one-shot logits."""
    model = load_model(tiny_checkpoint("glm45"))
    long_prompt, short_prompt = _prompts(model.config.vocab_size, lengths=(23, 6), seed=4)
    kv = PagedKVCache(model.config, num_blocks=32, block_size_tokens=4)
    one_shot_table = kv.allocator.allocate(6)
    one_shot = model.forward(build_batch([SequenceChunk(long_prompt, 0, one_shot_table,
                                                         num_logits=len(long_prompt))], 4), kv).logits

    table_a, table_b = kv.allocator.allocate(6), kv.allocator.allocate(3)
    model.forward(build_batch([SequenceChunk(short_prompt, 0, table_b)], 4), kv)
    got = []
    for start, end in ((0, 10), (10, 11), (11, 23)):
        step = [SequenceChunk(long_prompt[start:end], start, table_a, num_logits=end - start),
                SequenceChunk([7], len(short_prompt) + start // 10, table_b)]
        got.append(model.forward(build_batch(step, 4), kv).logits[: end - start])
    torch.testing.assert_close(torch.cat(got), one_shot, atol=TOLERANCE, rtol=0)


def test_transformers_ignores_the_mtp_layer_as_for_the_official_checkpoint(tiny_checkpoint):
    """With the official layer count (46), HF's load skips ``model.layers.46.*`` silently."""
    folder = tiny_checkpoint("air46")
    _, info = HFGlm4Moe.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
