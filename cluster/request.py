"""A request's life in the coordinator: its tokens, KV blocks, sampling, stop state and stream.

The scheduler reads and moves requests between queues; the engine appends sampled tokens,
detokenizes incrementally, applies stop conditions and pushes ``RequestOutput`` items to the
request's stream.

With overlapped scheduling (the engine sends the next step before the last one's tokens are
back) a step's sampled token is known only later: the engine appends a placeholder when it sends
the step and overwrites it when the token arrives. A placeholder is ``-(row + 1)``: the token
that row of the attention worker's previous step sampled, which the worker substitutes itself
(``workers.model_runner``). Placeholders are always the tail of ``output_ids``.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from cluster.stop_checker import StopChecker
from cluster.tokenizer import IncrementalDetokenizer
from workers.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One streamed update of a request (new tokens since the last update)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None     # "stop" | "length" | "abort" | None while running
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None      # set when a worker failure ended the request


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int                                  # admission order; the newest is preempted first
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    stop_token_ids: frozenset[int]
    max_total_tokens: int                         # context limit: prompt + output never exceed it
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    worker: int | None = None
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0                           # tokens whose K/V are in the cache
    text: str = ""
    sent_chars: int = 0
    finish_reason: str | None = None
    aborted: bool = False
    preemptions: int = 0
    num_unresolved: int = 0                       # placeholders at the tail of output_ids (see above)
    stream: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building all_ids when the range lies in the output (decode)."""
        prompt_len = len(self.prompt_ids)
        if start >= prompt_len:
            return self.output_ids[start - prompt_len:end - prompt_len]
        return self.all_ids[start:end]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def is_last_output(self, produced: int) -> bool:
        """Whether output token number ``produced`` is the request's last (its length or context limit)."""
        return produced >= self.params.max_new_tokens or len(self.prompt_ids) + produced >= self.max_total_tokens

    @property
    def last_token_scheduled(self) -> bool:
        """The request's final token is already known or in flight."""
        return self.is_last_output(len(self.output_ids))

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
