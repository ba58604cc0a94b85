"""Sampling: turn one engine step's next-token logits into one token per running request.

The coordinator calls `Sampler.sample` once per step with the logits ``[B, V]`` (float32) of the
``B`` running requests, each carrying its own `SamplingParams`. Semantics follow vLLM:

1. penalties on the raw logits: repetition over prompt + output tokens (a positive logit is
   divided by the penalty, a non-positive one multiplied), then presence and frequency over output
   tokens only (``logit -= presence * (count > 0) + frequency * count``);
2. greedy requests (temperature below `GREEDY_TEMPERATURE`) take the argmax of the penalised logits;
3. the others go through temperature → top-k → top-p → min-p (`process_logits`) and draw one token
   from the resulting distribution with their own generator.

Logprobs are the log-softmax of the penalised logits, before temperature and truncation: the
model's distribution as the penalties shape it, independent of how the request chose to sample
from it. (vLLM v1 by default reports the distribution before penalties too; the two agree whenever
no penalty is set.)

The batch is processed with per-row parameter tensors, so requests with different settings share
one pass. Draws use the exponential race (``argmax(p / q)`` with ``q ~ Exp(1)``), which is exactly a
categorical draw; the noise of a seeded request comes from its own CPU generator, so its tokens
depend only on its seed and its own logits row, whatever else is in the batch and on whichever
device the logits live.
"""

import functools
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

# Temperatures below this are treated as greedy: dividing logits by a smaller number only risks
# overflow, and the distribution is already a point mass to float32 precision.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_PENALTY_MAGNITUDE = 2.0


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; `field` names it so the frontend can report it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens and when it stops. Validated on construction.

    `stop_token_ids`, `stop`, `ignore_eos` and `max_new_tokens` are stop conditions the coordinator
    checks after each step; the rest shape the draw. Sequences passed for `stop_token_ids` or `stop`
    are stored as tuples so the parameters stay hashable.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    @functools.cached_property
    def field_values(self) -> tuple:
        """Every field's value in declaration order, worked out once (the step wire sends them)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def validate(self, max_context_len: int | None = None) -> None:
        """Raise `InvalidSamplingParams` for the first out-of-range field.

        `max_context_len` (tokens), when given, also bounds `max_new_tokens`.
        """
        if self.max_new_tokens <= 0:
            raise InvalidSamplingParams("max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        if max_context_len is not None and self.max_new_tokens > max_context_len:
            raise InvalidSamplingParams(
                "max_new_tokens", f"{self.max_new_tokens} exceeds the model's context of {max_context_len} tokens"
            )
        if not self.temperature >= 0:  # also rejects NaN
            raise InvalidSamplingParams("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidSamplingParams("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParams("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InvalidSamplingParams("min_p", f"must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise InvalidSamplingParams("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY_MAGNITUDE <= value <= MAX_PENALTY_MAGNITUDE:
                raise InvalidSamplingParams(name, f"must be in [-2, 2], got {value}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidSamplingParams("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidSamplingParams("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(s == "" for s in self.stop):
            raise InvalidSamplingParams("stop", "stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParams("stop_token_ids", "token ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class SampleResult:
    """One step's draw, row-aligned with the batch.

    `logprobs[i]` is the chosen token's logprob, None when the request asked for none;
    `top_logprobs[i]` holds the request's `logprobs` most likely ``(token_id, logprob)`` pairs, most
    likely first (empty for ``logprobs=0``), None when it asked for none.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def new_generator(seed: int | None) -> torch.Generator | None:
    """The generator a request keeps for its lifetime: seeded from `seed`, None for unseeded requests.

    Seeded generators live on the CPU so a request replays identically on any device.
    """
    if seed is None:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """How often each token occurs in each list: ``[len(token_lists), vocab_size]`` float32."""
    width = max((len(ids) for ids in token_lists), default=0)
    # Pad with an extra column `vocab_size` that is dropped after counting.
    padded = torch.tensor(
        [ids + [vocab_size] * (width - len(ids)) for ids in token_lists], dtype=torch.int64, device=device
    ).reshape(len(token_lists), width)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: Tensor, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]]
) -> Tensor:
    """Repetition, presence and frequency penalties as vLLM defines them; returns a new tensor.

    Only rows whose request sets a penalty are touched.
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    vocab_size, device = logits.shape[1], logits.device
    out = logits.clone()
    row_index = torch.tensor(rows, device=device)
    sub = out[row_index]
    output_counts = _token_counts([output_ids[i] for i in rows], vocab_size, device)
    prompt_counts = _token_counts([prompt_ids[i] for i in rows], vocab_size, device)

    def column(name: str) -> Tensor:
        return torch.tensor([getattr(params[i], name) for i in rows], dtype=sub.dtype, device=device)[:, None]

    repetition = column("repetition_penalty")
    seen = (prompt_counts > 0) | (output_counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    sub = sub - column("frequency_penalty") * output_counts - column("presence_penalty") * (output_counts > 0)
    out[row_index] = sub
    return out


def _apply_top_k_top_p(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """Mask to -inf what top-k then top-p remove; one descending sort serves both.

    Top-k keeps every token at least as likely as the k-th (ties at the boundary survive). Top-p
    keeps the smallest prefix of the sorted, top-k-renormalised distribution whose mass reaches
    `top_p`: a token survives when the mass strictly before it is below `top_p`.
    """
    vocab_size, device = logits.shape[1], logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([min(k, vocab_size) if k > 0 else vocab_size for k in top_k], device=device)
    kth_logit = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_logit, -math.inf)

    p = torch.tensor(top_p, dtype=logits.dtype, device=device)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with top_p == 1 are exempt: rounding can push the cumulative mass to 1 before the tail.
    drop = (mass_before >= p) & (p < 1)
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_min_p(logits: Tensor, min_p: list[float]) -> Tensor:
    """Mask tokens whose probability is below ``min_p`` times the most likely token's.

    The ratio of two probabilities is the exponential of their logit difference, so no softmax
    is needed; ``min_p = 0`` gives a threshold of -inf and masks nothing.
    """
    log_min_p = torch.tensor(min_p, dtype=logits.dtype, device=logits.device).log()[:, None]
    max_logit = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits - max_logit < log_min_p, -math.inf)


def process_logits(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature → top-k → top-p → min-p; the log-probabilities each row is drawn from.

    `logits` are already penalised. Masked tokens get -inf. Every row must be non-greedy: a greedy
    request has no distribution to process, it takes the argmax.
    """
    if any(p.greedy for p in params):
        raise ValueError("process_logits takes non-greedy rows only; greedy rows take the argmax")
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    scaled = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        scaled = _apply_top_k_top_p(scaled, [p.top_k for p in params], [p.top_p for p in params])
    if any(p.min_p > 0 for p in params):
        scaled = _apply_min_p(scaled, [p.min_p for p in params])
    return scaled.log_softmax(dim=-1)


class Sampler:
    """Samples one token per request per step; owns the generators of unseeded requests.

    `seed` fixes those shared generators (one per device, created on first use), which makes a
    whole run reproducible in tests; seeded requests never touch them.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._shared[device] = generator
        return self._shared[device]

    def _draw(self, log_probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
        """One categorical draw per row via the exponential race."""
        noise = torch.empty_like(log_probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            index = torch.tensor(unseeded, device=log_probs.device)
            shared = self._shared_generator(log_probs.device)
            noise[index] = torch.empty(len(unseeded), log_probs.shape[1], device=log_probs.device).exponential_(
                generator=shared
            )
        for i, generator in enumerate(generators):
            if generator is not None:
                row = torch.empty(log_probs.shape[1], dtype=log_probs.dtype, device=generator.device)
                noise[i] = row.exponential_(generator=generator).to(log_probs.device)
        # Exp(1) draws can be exactly 0; a tiny floor keeps masked tokens at 0 / tiny = 0, not NaN.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return (log_probs.exp() / noise).argmax(dim=-1)

    def sample(
        self,
        logits: Tensor,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
    ) -> SampleResult:
        """Draw the next token of each of the ``B`` requests whose logits ``[B, V]`` are given.

        `prompt_ids` and `output_ids` are each request's tokens so far (for the penalties);
        `generators[i]` is request i's generator from `new_generator`, None for unseeded requests.
        """
        batch_size = logits.shape[0]
        if logits.dim() != 2 or not (
            len(params) == len(prompt_ids) == len(output_ids) == len(generators) == batch_size
        ):
            raise ValueError(
                f"logits {tuple(logits.shape)} must be [B, V] with B matching params ({len(params)}), "
                f"prompt_ids ({len(prompt_ids)}), output_ids ({len(output_ids)}), generators ({len(generators)})"
            )
        penalised = apply_penalties(logits, params, prompt_ids, output_ids)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:  # every row greedy: one argmax, no row indexing
            token_ids = penalised.argmax(dim=-1)
        else:
            token_ids = torch.empty(batch_size, dtype=torch.int64, device=logits.device)
            if greedy:
                index = torch.tensor(greedy, device=logits.device)
                token_ids[index] = penalised[index].argmax(dim=-1)
            index = torch.tensor(sampled, device=logits.device)
            log_probs = process_logits(penalised[index], [params[i] for i in sampled])
            token_ids[index] = self._draw(log_probs, [generators[i] for i in sampled])

        tokens = token_ids.tolist()
        logprobs: list[float | None] = [None] * batch_size
        top_logprobs: list[list[tuple[int, float]] | None] = [None] * batch_size
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            index = torch.tensor(wanted, device=logits.device)
            model_log_probs = penalised[index].log_softmax(dim=-1)
            chosen = model_log_probs.gather(1, token_ids[index][:, None]).squeeze(1).tolist()
            top_n = max(params[i].logprobs or 0 for i in wanted)
            top_values, top_ids = model_log_probs.topk(top_n, dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
            for row, i in enumerate(wanted):
                n = params[i].logprobs or 0
                logprobs[i] = chosen[row]
                top_logprobs[i] = list(zip(top_ids[row][:n], top_values[row][:n], strict=True))
        return SampleResult(token_ids=tokens, logprobs=logprobs, top_logprobs=top_logprobs)
