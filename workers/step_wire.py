"""The step channel's wire format: one engine step to an attention worker and its output back.

The coordinator sends every step to every attention worker, so the encoding is compact msgpack
of plain lists (no pickle): chunks as ``[token_ids, start_position, block_table, num_logits]``,
sampling rows as ``[params index, draw_index, prompt_ids, output_ids]`` with each distinct
``SamplingParams`` of the step sent once as its field values (all of them in one nested msgpack
blob, unpacked into tuples that key the worker's cache directly). The worker keeps the parameter
objects it has built (``SamplingParamsCache``), so a request's parameters are validated once, not
every step. Replies are ``["ok", token_ids, logprobs, top_logprobs]`` or
``["error", type name, message]``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields

import msgpack

from workers.batch import SequenceChunk
from workers.model_runner import RowSampling, StepOutput
from workers.sampling import SamplingParams

_PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))
_TUPLE_FIELDS = {"stop_token_ids", "stop"}


class StepWireError(ValueError):
    """A step message that does not decode."""


def encode_step(step_id: int, chunks: list[SequenceChunk], sampling: list[RowSampling]) -> bytes:
    params_index: dict[int, int] = {}
    params: list[tuple] = []
    rows = []
    for row in sampling:
        key = id(row.params)
        if key not in params_index:
            params_index[key] = len(params)
            params.append(row.params.field_values)
        rows.append([params_index[key], row.draw_index, row.prompt_ids, row.output_ids])
    # The parameters travel as one nested msgpack blob: unpacked into tuples, each set of values is
    # the worker cache's key as it comes.
    body = [step_id, [[c.token_ids, c.start_position, c.block_table, c.num_logits] for c in chunks],
            msgpack.packb(params), rows]
    return msgpack.packb(body)


class SamplingParamsCache:
    """SamplingParams by their field values, least recently used dropped beyond ``capacity``."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._built: OrderedDict[tuple, SamplingParams] = OrderedDict()

    def get(self, values: tuple) -> SamplingParams:
        """The parameters with these field values (as ``decode_step`` unpacks them: nested tuples)."""
        params = self._built.get(values)
        if params is None:
            if len(values) != len(_PARAM_FIELDS):
                raise StepWireError(f"sampling parameters carry {len(values)} values, expected {len(_PARAM_FIELDS)}")
            params = SamplingParams(**dict(zip(_PARAM_FIELDS, values, strict=True)))
            self._built[values] = params
            if len(self._built) > self.capacity:
                self._built.popitem(last=False)
        else:
            self._built.move_to_end(values)
        return params


def decode_step(data: bytes, cache: SamplingParamsCache) -> tuple[int, list[SequenceChunk], list[RowSampling]]:
    try:
        step_id, raw_chunks, raw_params, raw_rows = msgpack.unpackb(data)
        chunks = [SequenceChunk(tokens, start, table, num_logits) for tokens, start, table, num_logits in raw_chunks]
        params = [cache.get(values) for values in msgpack.unpackb(raw_params, use_list=False)]
        sampling = [RowSampling(params[p], draw, tuple(prompt), tuple(output)) for p, draw, prompt, output in raw_rows]
    except StepWireError:
        raise
    except Exception as exc:  # msgpack and unpacking raise many types on a malformed message
        raise StepWireError(f"malformed step message ({type(exc).__name__}: {exc})") from None
    return step_id, chunks, sampling


def encode_output(step_id: int, output: StepOutput) -> bytes:
    return msgpack.packb([step_id, "ok", output.token_ids, output.logprobs, output.top_logprobs])


def encode_error(step_id: int, exc: BaseException) -> bytes:
    return msgpack.packb([step_id, "error", type(exc).__name__, str(exc)])


def decode_reply(data: bytes) -> tuple[int, StepOutput | str]:
    """(step id, the output) or (step id, "Type: message") for a step that failed on the worker."""
    try:
        step_id, status, *rest = msgpack.unpackb(data)
        if status == "ok":
            token_ids, logprobs, top = rest
            top = [None if t is None else [(int(i), float(lp)) for i, lp in t] for t in top]
            return step_id, StepOutput(token_ids, logprobs, top)
        kind, message = rest
        return step_id, f"{kind}: {message}"
    except Exception as exc:
        raise StepWireError(f"malformed step reply ({type(exc).__name__}: {exc})") from None
