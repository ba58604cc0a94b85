"""The serving-side tokenizer: text <-> ids, the chat template, and streaming detokenization.

The frontend turns chat requests into prompt ids and the coordinator turns generated ids back into
text deltas; both use this module, loaded from a checkpoint folder (a tiny one made by
``workers.tiny_tokenizer`` or the official GLM-4.5 one). It reads the folder's ``tokenizer.json``
with the ``tokenizers`` library and renders its chat template with jinja2 in the same environment
transformers uses (sandboxed, ``trim_blocks``/``lstrip_blocks``, a ``tojson`` filter that does not
escape HTML, a ``raise_exception`` helper), so a prompt is the string transformers would build —
without importing transformers at serving time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

# The named special tokens transformers hands to every chat template (``special_tokens_map``).
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names under which clients send an assistant turn's reasoning; templates read ``reasoning_content``.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be loaded, or a conversation its chat template cannot render."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_chat_template(source: str, origin: Path) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template in {origin} does not compile: line {e.lineno}: {e.message}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e


def _token_text(value: str | dict[str, Any]) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value if isinstance(value, str) else value["content"]


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as transformers hands them to a template: None values dropped, reasoning aliased."""
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"message {index} is a {type(message).__name__}, not a dict")
        if not isinstance(message.get("role"), str):
            raise TokenizerError(f"message {index} has no 'role' (got keys {sorted(message)})")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


class Tokenizer:
    """A checkpoint folder's tokenizer and chat template.

    ``vocab_size`` counts the ids the tokenizer knows, added tokens included; the model's embedding
    may have more rows. ``eos_token_ids`` are the ids that end generation: ``eos_token_id`` of
    ``generation_config.json``, else of ``config.json``, else the tokenizer config's ``eos_token``.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: jinja2.Template | None,
        template_tokens: dict[str, str],
        eos_token_ids: tuple[int, ...],
        folder: Path,
    ) -> None:
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self._template_tokens = template_tokens
        self.eos_token_ids = eos_token_ids
        self.folder = folder

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust library raises plain Exception on a malformed file
            raise TokenizerError(f"{tokenizer_file} cannot be loaded: {e}") from e

        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        # transformers saves the template as chat_template.jinja and prefers that file when both exist.
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            chat_template = _compile_chat_template(template_file.read_text(encoding="utf-8"), template_file)
        elif isinstance(config.get("chat_template"), str):
            chat_template = _compile_chat_template(config["chat_template"], config_file)
        else:
            chat_template = None
        template_tokens = {name: _token_text(config[name]) for name in _TEMPLATE_TOKEN_NAMES if config.get(name)}

        eos_token_ids: tuple[int, ...] = ()
        for name in ("generation_config.json", "config.json"):
            if (folder / name).is_file():
                eos = _read_json(folder / name).get("eos_token_id")
                if eos is not None:
                    eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
                    break
        if not eos_token_ids and "eos_token" in template_tokens:
            eos_id = tokenizer.token_to_id(template_tokens["eos_token"])
            if eos_id is None:
                raise TokenizerError(f"eos_token {template_tokens['eos_token']!r} of {config_file} is not in the vocab")
            eos_token_ids = (eos_id,)
        return cls(tokenizer, chat_template, template_tokens, eos_token_ids, folder)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation, as transformers' ``apply_chat_template(tokenize=False)``.

        ``enable_thinking=None`` leaves the template's default (GLM-4.5: thinking on).
        """
        if self._chat_template is None:
            raise TokenizerError(f"{self.folder} has no chat template (tokenizer_config.json or chat_template.jinja)")
        if not messages:
            raise TokenizerError("cannot apply the chat template to an empty conversation")
        variables: dict[str, Any] = {
            **self._template_tokens,
            "messages": _template_messages(messages),
            "tools": tools,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return self._chat_template.render(**variables)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template of {self.folder} rejected the conversation: {e}") from e

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The prompt ids; the template writes its own special tokens, so none are added."""
        text = self.apply_chat_template(messages, add_generation_prompt, enable_thinking, tools)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas, one ``step`` per batch of new ids.

    Each step decodes only a short window: the ids of the previous emitted delta (the prefix, which
    gives decoders that depend on context the same start as a full decode) plus the ids not yet
    emitted. The delta is the window's text minus the prefix's text. While the window's text ends in
    U+FFFD, a UTF-8 character is still split across ids, so nothing is emitted and the ids wait for
    the next step. The concatenation of all deltas and ``flush()`` equals ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # prefix ids, then ids not yet emitted
        self._prefix_len = 0

    def step(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (possibly empty)."""
        self._window.extend(new_ids)
        prefix_text, text = self._decode_window()
        if text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._window = self._window[self._prefix_len :]
        self._prefix_len = len(self._window)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back at the end of generation (a cut-off character decodes as U+FFFD)."""
        prefix_text, text = self._decode_window()
        self._window = []
        self._prefix_len = 0
        return text[len(prefix_text) :]

    def _decode_window(self) -> tuple[str, str]:
        prefix = self._window[: self._prefix_len]
        return (
            self._tokenizer.decode(prefix, self._skip_special_tokens),
            self._tokenizer.decode(self._window, self._skip_special_tokens),
        )
