"""Sampling parameters, penalties, truncation masks, seeded draws and logprobs against direct computations."""

import math

import pytest
import torch

from workers.sampling import (
    InvalidSamplingParams,
    Sampler,
    SamplingParams,
    apply_penalties,
    new_generator,
    process_logits,
)

VOCAB = 64


def random_logits(batch: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator) * 3


def expected_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature → top-k → top-p → min-p computed directly in float64 on one row."""
    probs = (row.double() / params.temperature).softmax(dim=-1)
    allowed = torch.ones_like(probs, dtype=torch.bool)
    if params.top_k > 0:
        kth = probs.sort(descending=True).values[min(params.top_k, len(probs)) - 1]
        allowed &= probs >= kth
    if params.top_p < 1:
        renorm = torch.where(allowed, probs, 0) / torch.where(allowed, probs, 0).sum()
        values, order = renorm.sort(descending=True)
        before = torch.cat([torch.zeros(1, dtype=values.dtype), values.cumsum(0)[:-1]])
        keep_sorted = before < params.top_p
        keep = torch.zeros_like(allowed)
        keep[order] = keep_sorted
        allowed &= keep
    if params.min_p > 0:
        allowed &= probs >= params.min_p * probs[allowed].max()
    kept = torch.where(allowed, probs, 0)
    return kept / kept.sum()


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": math.nan}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -1}),
        ("min_p", {"min_p": -0.1}),
        ("min_p", {"min_p": 1.1}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
        ("logprobs", {"logprobs": -1}),
        ("logprobs", {"logprobs": 21}),
        ("stop", {"stop": tuple(f"s{i}" for i in range(17))}),
        ("stop", {"stop": ("ok", "")}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": -2.5}),
        ("stop_token_ids", {"stop_token_ids": (3, -1)}),
    ],
)
def test_validation_names_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_validation_against_context_length() -> None:
    params = SamplingParams(max_new_tokens=4096)
    params.validate(max_context_len=8192)
    with pytest.raises(InvalidSamplingParams) as info:
        params.validate(max_context_len=1024)
    assert info.value.field == "max_new_tokens"


def test_boundary_values_are_valid() -> None:
    SamplingParams(
        temperature=0.0,
        top_p=1.0,
        min_p=1.0,
        logprobs=20,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        stop=tuple(f"s{i}" for i in range(16)),
    )


def test_sequences_become_tuples_and_params_hash() -> None:
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])  # type: ignore[arg-type]
    assert params.stop == ("a", "b") and params.stop_token_ids == (1, 2)
    assert hash(params) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2)))


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.7).greedy


# --- greedy and temperature limits ----------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = random_logits(6, seed=1)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5)] * 6
    result = Sampler().sample(logits, params, [[]] * 6, [[]] * 6, [None] * 6)
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_low_temperature_approaches_greedy() -> None:
    logits = random_logits(4, seed=2)
    probs = process_logits(logits, [SamplingParams(temperature=1e-3)] * 4).exp()
    torch.testing.assert_close(probs, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float())
    sampler = Sampler(seed=0)
    for seed in range(20):
        params = [SamplingParams(temperature=1e-3, seed=seed)] * 4
        tokens = sampler.sample(logits, params, [[]] * 4, [[]] * 4, [new_generator(seed)] * 4).token_ids
        assert tokens == logits.argmax(dim=-1).tolist()


def test_high_temperature_approaches_uniform() -> None:
    logits = random_logits(2, seed=3)
    probs = process_logits(logits, [SamplingParams(temperature=1e6)] * 2).exp()
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / VOCAB))


def test_process_logits_rejects_greedy_rows() -> None:
    with pytest.raises(ValueError, match="greedy"):
        process_logits(random_logits(1, seed=0), [SamplingParams(temperature=0.0)])


# --- truncation masks -------------------------------------------------------------------------------


TRUNCATION_CASES = [
    SamplingParams(temperature=0.8, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=VOCAB + 10),
    SamplingParams(temperature=2.0),
]


def test_processed_probabilities_equal_direct_computation() -> None:
    logits = random_logits(len(TRUNCATION_CASES), seed=4)
    # One mixed batch: each row's mask must follow its own parameters.
    probs = process_logits(logits, TRUNCATION_CASES).exp()
    for row, params in enumerate(TRUNCATION_CASES):
        expected = expected_probs(logits[row], params).float()
        torch.testing.assert_close(probs[row], expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(probs[row] > 0, expected > 0), params


def test_sampled_tokens_stay_in_allowed_set() -> None:
    logits = random_logits(len(TRUNCATION_CASES), seed=5)
    allowed = [expected_probs(logits[row], p) > 0 for row, p in enumerate(TRUNCATION_CASES)]
    sampler = Sampler()
    for seed in range(200):
        generators = [new_generator(seed * 100 + row) for row in range(len(TRUNCATION_CASES))]
        batch = len(TRUNCATION_CASES)
        tokens = sampler.sample(logits, TRUNCATION_CASES, [[]] * batch, [[]] * batch, generators).token_ids
        for row, token in enumerate(tokens):
            assert allowed[row][token], (TRUNCATION_CASES[row], token)


def test_draw_frequencies_match_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=1.0, top_k=4)
    expected = expected_probs(logits[0], params)
    draws = 20_000
    sampler = Sampler(seed=7)
    counts = torch.zeros(6)
    batch = torch.cat([logits] * draws)
    tokens = sampler.sample(batch, [params] * draws, [[]] * draws, [[]] * draws, [None] * draws).token_ids
    counts += torch.bincount(torch.tensor(tokens), minlength=6)
    # Standard error of each frequency is below 0.004 at 20k draws.
    torch.testing.assert_close(counts / draws, expected.float(), atol=0.015, rtol=0)


def test_top_k_one_is_argmax() -> None:
    logits = random_logits(3, seed=6)
    params = [SamplingParams(top_k=1, seed=s) for s in range(3)]
    tokens = Sampler().sample(logits, params, [[]] * 3, [[]] * 3, [new_generator(s) for s in range(3)]).token_ids
    assert tokens == logits.argmax(dim=-1).tolist()


# --- penalties ------------------------------------------------------------------------------------------


def direct_penalties(row: list[float], params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    out = list(row)
    for token in set(prompt) | set(output):
        value = out[token]
        out[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token in set(output):
        count = output.count(token)
        out[token] -= params.presence_penalty + params.frequency_penalty * count
    return out


def test_penalties_equal_direct_computation() -> None:
    logits = random_logits(4, seed=8)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=1.5),
    ]
    prompts = [[1, 2, 2, 5], [3, 4], [1, 2, 3], [0, 63, 10]]
    outputs = [[5, 6, 6, 6], [4, 7, 7, 9, 7], [2, 2], []]
    penalised = apply_penalties(logits, params, prompts, outputs)
    for row in range(4):
        expected = direct_penalties(logits[row].tolist(), params[row], prompts[row], outputs[row])
        torch.testing.assert_close(penalised[row], torch.tensor(expected))
    assert torch.equal(penalised[2], logits[2]), "a row without penalties is untouched"
    assert not torch.equal(penalised, logits), "the input is not modified in place"
    assert torch.equal(logits, random_logits(4, seed=8))


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    assert Sampler().sample(logits, params, [[0]], [[]], [None]).token_ids == [1]


# --- seeds ------------------------------------------------------------------------------------------------


def run_steps(sampler: Sampler, row_params: list[SamplingParams], target_row: int, steps: int) -> list[int]:
    """Decode `steps` tokens for a batch; each row's logits depend only on (its params' seed, step)."""
    generators = [new_generator(p.seed) for p in row_params]
    outputs: list[list[int]] = [[] for _ in row_params]
    for step in range(steps):
        logits = torch.cat([random_logits(1, seed=1000 * step + (p.seed or 0)) for p in row_params])
        prompts = [[1, 2, 3]] * len(row_params)
        result = sampler.sample(logits, row_params, prompts, outputs, generators)
        for row, token in enumerate(result.token_ids):
            outputs[row].append(token)
    return outputs[target_row]


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    target = SamplingParams(temperature=1.2, top_p=0.9, top_k=20, seed=1234, frequency_penalty=0.3)
    alone = run_steps(Sampler(), [target], target_row=0, steps=8)
    assert run_steps(Sampler(), [target], target_row=0, steps=8) == alone
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, seed=5),
        SamplingParams(temperature=1.0, min_p=0.1),  # unseeded: uses the shared generator
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, seed=77),
    ]
    for position in range(len(neighbours) + 1):
        batch = [*neighbours[:position], target, *neighbours[position:]]
        assert run_steps(Sampler(), batch, target_row=position, steps=8) == alone
    other_seed = SamplingParams(temperature=1.2, top_p=0.9, top_k=20, seed=4321, frequency_penalty=0.3)
    assert run_steps(Sampler(), [other_seed], target_row=0, steps=8) != alone


def test_new_generator() -> None:
    assert new_generator(None) is None
    a, b = new_generator(3), new_generator(3)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_sampler_seed_makes_unseeded_requests_reproducible() -> None:
    logits = random_logits(8, seed=9)
    params = [SamplingParams()] * 8
    first = Sampler(seed=11).sample(logits, params, [[]] * 8, [[]] * 8, [None] * 8).token_ids
    second = Sampler(seed=11).sample(logits, params, [[]] * 8, [[]] * 8, [None] * 8).token_ids
    assert first == second


# --- logprobs ---------------------------------------------------------------------------------------------


def test_logprobs_equal_log_softmax_of_penalised_logits() -> None:
    logits = random_logits(4, seed=10)
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=5, seed=1),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0, logprobs=None),
        SamplingParams(temperature=1.0, logprobs=2, repetition_penalty=1.4, seed=2),
    ]
    prompts, outputs = [[]] * 3 + [[7, 8]], [[]] * 3 + [[9]]
    result = Sampler().sample(logits, params, prompts, outputs, [new_generator(p.seed) for p in params])
    model = apply_penalties(logits, params, prompts, outputs).log_softmax(dim=-1)
    for row, p in enumerate(params):
        if p.logprobs is None:
            assert result.logprobs[row] is None and result.top_logprobs[row] is None
            continue
        assert result.logprobs[row] == pytest.approx(model[row, result.token_ids[row]].item())
        values, ids = model[row].topk(p.logprobs)
        top = result.top_logprobs[row]
        assert top is not None and [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist())
    assert result.top_logprobs[1] == []


def test_mismatched_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="generators"):
        Sampler().sample(random_logits(2, seed=0), [SamplingParams()] * 2, [[]] * 2, [[]] * 2, [None])
