"""The serving tokenizer: encode/decode, chat-template parity with transformers, streaming deltas."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError
from workers.tiny_tokenizer import EOS_TOKENS, build_tokenizer_files, special_token_ids

VOCAB_SIZE = 512


def write_folder(path: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in build_tokenizer_files(vocab_size).items():
        (path / name).write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_folder(tmp_path_factory.mktemp("checkpoint"))
    ids = special_token_ids(VOCAB_SIZE)
    config = {"pad_token_id": ids["<|endoftext|>"], "eos_token_id": [ids[t] for t in EOS_TOKENS]}
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf(folder: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(folder))


def test_loads_sizes_and_eos_ids(tok: Tokenizer, tmp_path: Path) -> None:
    ids = special_token_ids(VOCAB_SIZE)
    assert tok.vocab_size == max(ids.values()) + 1 <= VOCAB_SIZE
    assert tok.eos_token_ids == tuple(ids[t] for t in EOS_TOKENS)
    # generation_config.json wins over config.json; without either, the tokenizer config's eos_token.
    bare = write_folder(tmp_path / "bare")
    assert Tokenizer.from_folder(bare).eos_token_ids == (ids["<|endoftext|>"],)
    (bare / "config.json").write_text(json.dumps({"eos_token_id": 7}), encoding="utf-8")
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|user|>"]]}), encoding="utf-8")
    assert Tokenizer.from_folder(bare).eos_token_ids == (ids["<|user|>"],)


@pytest.mark.parametrize(
    "text",
    ["plain ASCII, with punctuation!", "café crème brûlée", "北京和上海", "emoji 😀🚀👨‍👩‍👧 ok", "\tmixed\nlines  \n"],
)
def test_round_trip_matches_transformers(tok: Tokenizer, hf: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_and_skipped_on_decode(tok: Tokenizer) -> None:
    ids = special_token_ids(VOCAB_SIZE)
    for token, token_id in ids.items():
        assert tok.encode(token) == [token_id]
    text = "<|assistant|>\n<think>plan</think>\nanswer<|user|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode(text)) == "\n<think>plan</think>\nanswer"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_TURN = [
    {"role": "user", "content": "What is the weather in 北京 and Paris?"},
    {
        "role": "assistant",
        "content": "<think>Two cities, two calls.</think>Let me check.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}},
        ],
    },
    {"role": "tool", "content": '{"temp_c": 31, "sky": "☀️"}'},
    {"role": "tool", "content": '{"temp_c": 18}'},
]
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "system_user": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}], {}),
    "multi_turn_reasoning": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
            {"role": "user", "content": "And times 3?"},
            {"role": "assistant", "content": "\n12", "reasoning": "\nMultiply 4 by 3.\n"},
        ],
        {"add_generation_prompt": False},
    ),
    "tool_messages": (TOOL_TURN, {"tools": [WEATHER_TOOL]}),
    "tool_call_without_content": (
        [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "now", "arguments": {}}}]},
            {"role": "tool", "content": "noon"},
        ],
        {},
    ),
    "thinking_off": (TOOL_TURN[:1], {"enable_thinking": False}),
    "thinking_on": (TOOL_TURN[:1], {"enable_thinking": True}),
    "with_tools_thinking_off": (
        [{"role": "system", "content": "Use tools."}, *TOOL_TURN],
        {"tools": [WEATHER_TOOL], "enable_thinking": False},
    ),
    "list_content": (
        [{"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "this."}]}],
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tok: Tokenizer, hf: PreTrainedTokenizerBase, name: str) -> None:
    messages, options = CONVERSATIONS[name]
    add_generation_prompt = options.get("add_generation_prompt", True)
    hf_options = {k: v for k, v in options.items() if k != "add_generation_prompt"}
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **hf_options
    )
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **hf_options)
    assert ours == expected
    assert ours.startswith("[gMASK]<sop>")
    expected_ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False, **hf_options
    )
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt, **hf_options) == expected_ids


def test_messages_are_not_modified(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning": "r"}]
    snapshot = json.dumps(messages)
    tok.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot


def test_errors_name_the_problem(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json in"):
        Tokenizer.from_folder(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="message 1 has no 'role'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(TokenizerError, match="message 0 is a str"):
        tok.apply_chat_template(["hello"])  # type: ignore[list-item]
    with pytest.raises(TokenizerError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(TokenizerError, match="unknown role narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])
    string_args = {"function": {"name": "f", "arguments": '{"a": 1}'}}
    with pytest.raises(TokenizerError, match="tool call f: arguments must be a mapping"):
        tok.apply_chat_template([{"role": "assistant", "content": "", "tool_calls": [string_args]}])

    broken = write_folder(tmp_path / "broken")
    config = json.loads((broken / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{% for m in messages %}{{ m.content }}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerError, match="chat template in .*tokenizer_config.json does not compile"):
        Tokenizer.from_folder(broken)
    del config["chat_template"]
    (broken / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerError, match="has no chat template"):
        Tokenizer.from_folder(broken).apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_jinja_file_takes_precedence(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "ckpt")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}", encoding="utf-8")
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "[user]"


STREAM_PIECES = [
    "Hello",
    " world",
    ", ",
    "café",
    " 北京",
    "上海",
    " 😀",
    "🚀",
    "👨‍👩‍👧",
    " naïve",
    " Привет",
    "\n",
    "def f(x):",
    " ∑",
    "ÿ",
    "𝔘𝔫𝔦",
    " <think>",
    "</think>",
    "<|user|>",
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
]


def random_stream(rng: random.Random, tok: Tokenizer) -> list[int]:
    """Ids of random text: multi-byte characters (often split across byte tokens) and added tokens."""
    text = "".join(rng.choice(STREAM_PIECES) for _ in range(rng.randint(1, 40)))
    return tok.encode(text)


def feed(detok: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random) -> list[str]:
    deltas, position = [], 0
    while position < len(ids):
        count = rng.choice([1, 1, 1, 2, 3, 5])
        deltas.append(detok.step(ids[position : position + count]))
        position += count
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_deltas_concatenate_to_full_decode(tok: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(0)
    split_characters = 0
    for _ in range(300):
        ids = random_stream(rng, tok)
        split_characters += any("\ufffd" in tok.decode([i]) for i in ids)
        deltas = feed(IncrementalDetokenizer(tok, skip_special_tokens), ids, rng)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens)
        assert not any("\ufffd" in delta for delta in deltas)
    assert split_characters > 100  # the streams really do split characters across ids


def test_token_by_token_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1, "the emoji should take several byte tokens in the tiny vocab"
    detok = IncrementalDetokenizer(tok)
    assert [detok.step([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_flush_returns_a_cut_off_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    detok = IncrementalDetokenizer(tok)
    cut = ids[:-1]
    streamed = "".join(detok.step([i]) for i in cut)
    assert streamed.startswith("ok") and "\ufffd" not in streamed
    rest = detok.flush()
    assert rest.endswith("\ufffd") and streamed + rest == tok.decode(cut)


class CountingTokenizer(Tokenizer):
    """A real tokenizer that records how many ids each decode call sees."""

    decoded_lengths: list[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_step_decodes_a_short_window(folder: Path) -> None:
    counting = CountingTokenizer.from_folder(folder)
    counting.decoded_lengths = []
    ids = counting.encode("The weather in 北京 is ☀️ and 31 °C. " * 100)
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.step([i]) for i in ids) + detok.flush()
    assert text == counting.decode(ids)
    assert len(ids) > 1000
    assert max(counting.decoded_lengths[:-1]) <= 8  # the last call is the full decode above
