"""Placeholders for the previous step's tokens (overlapped scheduling): a step that names a token
of the step before by ``-(row + 1)`` computes exactly what it computes with the token itself."""

from __future__ import annotations

import pytest

from workers.batch import SequenceChunk
from workers.generate import load_model
from workers.kv_cache import PagedKVCache
from workers.model_runner import ModelRunner, RowSampling
from workers.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=2)
PENALISED = SamplingParams(max_new_tokens=8, temperature=0.7, seed=5, repetition_penalty=1.5, presence_penalty=1.0)


def _runner(checkpoint) -> ModelRunner:
    model = load_model(str(checkpoint))
    return ModelRunner(model, PagedKVCache(model.config, num_blocks=32, block_size_tokens=4))


def _prefill(runner: ModelRunner) -> list[int]:
    """Two prompts in one step; the tokens it samples (greedy row 0, penalised row 1)."""
    chunks = [SequenceChunk([3, 9, 27, 81], 0, [0, 1]), SequenceChunk([5, 25, 125], 0, [2, 3])]
    sampling = [RowSampling(GREEDY, 0), RowSampling(PENALISED, 0, (5, 25, 125), ())]
    return runner.execute(chunks, sampling).token_ids


def _decode(runner: ModelRunner, first: int, second: int):
    chunks = [SequenceChunk([first], 4, [0, 1]), SequenceChunk([second], 3, [2, 3])]
    sampling = [RowSampling(GREEDY, 1), RowSampling(PENALISED, 1, (5, 25, 125), (second,))]
    return runner.execute(chunks, sampling)


def test_a_step_naming_the_last_steps_tokens_computes_what_the_tokens_give(tiny_checkpoint):
    checkpoint = tiny_checkpoint("air")
    explicit, named = _runner(checkpoint), _runner(checkpoint)
    first, second = _prefill(explicit)
    assert _prefill(named) == [first, second]
    want = _decode(explicit, first, second)
    got = _decode(named, -1, -2)  # row 0's and row 1's tokens of the step before, penalties' history too
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs and got.top_logprobs == want.top_logprobs
    # ... and the next step names this one's
    assert _decode(named, -1, -2).token_ids == _decode(explicit, *want.token_ids).token_ids


def test_a_placeholder_without_a_previous_step_token_is_a_clear_error(tiny_checkpoint):
    runner = _runner(tiny_checkpoint("air"))
    with pytest.raises(ValueError, match="row 0 of the previous step's samples, but that step left no sampled"):
        _decode(runner, -1, 7)
    _prefill(runner)
    with pytest.raises(ValueError, match="row 4 of the previous step's samples, but that step left 2 sampled"):
        _decode(runner, -5, 7)
    with pytest.raises(ValueError, match="that step left no sampled tokens"):  # the failed step left none
        _decode(runner, -1, -2)
