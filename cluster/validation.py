"""Request validation for the gRPC frontend: a GenerateRequest becomes prompt ids and SamplingParams.

Every rejection is an `InvalidArgument` whose `field` is the request field's path as the client
wrote it (``prompt``, ``messages[1].role``, ``sampling.top_p``), so the frontend can answer
INVALID_ARGUMENT with a message the client can act on. Ranges of sampling parameters are checked
once, by `SamplingParams` itself; this module adds what needs the model: the vocabulary, the
context length, the chat template and the served model's name.

Invalid UTF-8 in a string field never reaches a handler as a message: protobuf refuses to parse it.
`parse_generate_request` is the RPC's deserializer; on such a request it re-reads the bytes with
every string field typed as bytes to find the offending field, and hands the handler an
`InvalidArgument` instead of a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from cluster import moecluster_pb2 as pb
from cluster.tokenizer import Tokenizer, TokenizerError
from workers.config import ModelConfig
from workers.sampling import InvalidSamplingParams, SamplingParams

_PROMPT_KINDS = ("prompt", "prompt_token_ids", "messages")


class InvalidArgument(ValueError):
    """A request field the server cannot accept; `field` is its path in the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ValidRequest:
    prompt_ids: list[int]
    params: SamplingParams


# ---- deserialisation ------------------------------------------------------------------------------
def _bytes_twin(file: Any) -> descriptor_pool.DescriptorPool:
    """A pool holding a copy of ``file`` with every string field typed as bytes (no UTF-8 check)."""
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)

    def retype(messages: Any) -> None:
        for msg in messages:
            for fld in msg.field:
                if fld.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                    fld.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            retype(msg.nested_type)

    retype(proto.message_type)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


_TWIN_POOL = _bytes_twin(pb.DESCRIPTOR)


def _bad_utf8_path(twin: message.Message, original: Any, prefix: str = "") -> str | None:
    """The path of the first field of ``twin`` that is a string in ``original`` and not valid UTF-8."""
    for fld, value in twin.ListFields():
        path = prefix + fld.name
        kind = original.fields_by_name[fld.name]
        items = list(value) if fld.is_repeated else [value]
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]" if fld.is_repeated else path
            if kind.type == kind.TYPE_STRING:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{item_path}@{e.start}"
            elif kind.type == kind.TYPE_MESSAGE:
                found = _bad_utf8_path(item, kind.message_type, item_path + ".")
                if found:
                    return found
    return None


def parse_generate_request(data: bytes) -> pb.GenerateRequest | InvalidArgument:
    """The deserializer of Generate and GenerateStream: a request, or the field that spoiled it."""
    try:
        return pb.GenerateRequest.FromString(data)
    except message.DecodeError as decode_error:
        twin_cls = message_factory.GetMessageClass(
            _TWIN_POOL.FindMessageTypeByName(pb.GenerateRequest.DESCRIPTOR.full_name))
        try:
            found = _bad_utf8_path(twin_cls.FromString(data), pb.GenerateRequest.DESCRIPTOR)
        except message.DecodeError:
            found = None
        if found is None:
            return InvalidArgument("request", f"cannot be parsed as a GenerateRequest: {decode_error}")
        path, offset = found.rsplit("@", 1)
        return InvalidArgument(path, f"is not valid UTF-8 (bad byte at offset {offset})")


# ---- validation -----------------------------------------------------------------------------------
def sampling_params(sampling: pb.SamplingParams) -> SamplingParams:
    """The coordinator's SamplingParams for the fields the client set; the rest take their defaults."""
    kwargs: dict[str, Any] = {
        name: getattr(sampling, name)
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "logprobs")
        if sampling.HasField(name)
    }
    kwargs.update(stop_token_ids=tuple(sampling.stop_token_ids), stop=tuple(sampling.stop),
                  ignore_eos=sampling.ignore_eos, include_stop_str_in_output=sampling.include_stop_str_in_output)
    try:
        return SamplingParams(**kwargs)
    except InvalidSamplingParams as e:
        raise InvalidArgument(f"sampling.{e.field}", str(e).removeprefix(f"{e.field}: ")) from None


def _chat_messages(request: pb.GenerateRequest) -> list[dict[str, str]]:
    messages = []
    for i, m in enumerate(request.messages):
        if not m.role:
            raise InvalidArgument(f"messages[{i}].role", "must be set (system, user, assistant or observation)")
        entry = {"role": m.role, "content": m.content}
        if m.reasoning_content:
            entry["reasoning_content"] = m.reasoning_content
        messages.append(entry)
    return messages


def prompt_ids(request: pb.GenerateRequest, tokenizer: Tokenizer, vocab_size: int) -> tuple[str, list[int]]:
    """(the prompt kind's field name, the prompt's token ids)."""
    kinds = [name for name in _PROMPT_KINDS if len(getattr(request, name))]
    if not kinds:
        raise InvalidArgument("prompt", "is empty: set one of prompt, prompt_token_ids or messages")
    if len(kinds) > 1:
        raise InvalidArgument("prompt",
                              f"set only one of prompt, prompt_token_ids and messages (got {', '.join(kinds)})")
    kind = kinds[0]
    if kind == "prompt":
        ids = tokenizer.encode(request.prompt)
    elif kind == "prompt_token_ids":
        ids = list(request.prompt_token_ids)
        for i, token in enumerate(ids):
            if not 0 <= token < vocab_size:
                raise InvalidArgument(f"prompt_token_ids[{i}]",
                                      f"{token} is outside the vocabulary 0..{vocab_size - 1}")
    else:
        enable_thinking = request.enable_thinking if request.HasField("enable_thinking") else None
        try:
            text = tokenizer.apply_chat_template(_chat_messages(request), enable_thinking=enable_thinking)
        except (TokenizerError, jinja2.exceptions.TemplateError) as e:
            raise InvalidArgument("messages", f"the chat template cannot render them: {e}") from None
        ids = tokenizer.encode(text)
    if not ids:
        raise InvalidArgument(kind, "encodes to no tokens")
    return kind, ids


def validate_generate(request: pb.GenerateRequest, model_name: str, model_config: ModelConfig,
                      tokenizer: Tokenizer) -> ValidRequest:
    """Check a GenerateRequest against the served model; raise `InvalidArgument` naming the field."""
    if request.model and request.model != model_name:
        raise InvalidArgument("model", f"unknown model {request.model!r}; this server serves {model_name!r}")
    context = model_config.max_position_embeddings
    params = sampling_params(request.sampling)
    kind, ids = prompt_ids(request, tokenizer, model_config.vocab_size)
    if len(ids) >= context:
        raise InvalidArgument(kind, f"is {len(ids)} tokens; the model's context is {context} tokens and must "
                                    "leave room for at least one generated token")
    if len(ids) + params.max_new_tokens > context:
        raise InvalidArgument("sampling.max_new_tokens",
                              f"{params.max_new_tokens} new tokens after a {len(ids)}-token prompt exceed the "
                              f"model's context of {context} tokens (at most {context - len(ids)})")
    return ValidRequest(ids, params)
