"""The tiny GLM-4.5 tokenizer: deterministic files, GLM's added tokens, and a folder transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer

from workers.tiny_tokenizer import (
    EOS_TOKENS,
    MARKUP_TOKENS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer_files,
    special_token_ids,
)

VOCAB_SIZE = 512
TEXTS = [
    "Hello, world! The quick brown fox.",
    "def add(a, b):\n    return a + b\n",
    "Un café crème, s'il vous plaît — déjà vu.",
    "北京欢迎你，上海也很好。",
    "こんにちは 서울 Привет",
    "Emoji 😀🚀 and flags 🇫🇷, family 👨‍👩‍👧",
    "  leading spaces\ttabs\n\nand blank lines  ",
    "unseen bytes: \x00\x7f ÿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    for name, text in build_tokenizer_files(VOCAB_SIZE).items():
        (path / name).write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_same_input_gives_byte_identical_files_across_processes() -> None:
    script = "import json; from workers.tiny_tokenizer import build_tokenizer_files as b; print(json.dumps(b(512)))"
    root = Path(__file__).resolve().parents[2]
    expected = build_tokenizer_files(VOCAB_SIZE)
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, check=True)
        assert json.loads(out.stdout) == expected


@pytest.mark.parametrize("vocab_size", [281, 300, 512, 4096])
def test_size_bound_and_every_byte_present(vocab_size: int) -> None:
    tok = Tokenizer.from_str(build_tokenizer_files(vocab_size)["tokenizer.json"])
    assert tok.get_vocab_size(with_added_tokens=True) <= vocab_size
    vocab = tok.get_vocab(with_added_tokens=False)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert sorted(tok.get_vocab(with_added_tokens=True).values()) == list(range(tok.get_vocab_size()))


def test_too_small_vocab_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size=280 is too small"):
        build_tokenizer_files(280)


def test_added_tokens_follow_glm_order_and_specialness(tokenizer: Tokenizer) -> None:
    ids = special_token_ids(VOCAB_SIZE)
    order = SPECIAL_TOKENS + MARKUP_TOKENS
    assert list(ids) == list(order)
    first = ids[order[0]]
    assert [ids[t] for t in order] == list(range(first, first + len(order)))
    assert first + len(order) == tokenizer.get_vocab_size(with_added_tokens=True)
    special = {t.content: t.special for t in tokenizer.get_added_tokens_decoder().values()}
    assert all(special[t] for t in SPECIAL_TOKENS)
    assert not any(special[t] for t in MARKUP_TOKENS)
    for token in order:
        assert ids[token] in tokenizer.encode(f"a {token} b", add_special_tokens=False).ids
        assert tokenizer.encode(token, add_special_tokens=False).ids == [ids[token]]
    assert PAD_TOKEN in ids and all(t in ids for t in EOS_TOKENS)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_are_skipped_and_markup_kept(tokenizer: Tokenizer) -> None:
    text = "[gMASK]<sop><|user|>\nhi<|assistant|>\n<think>why</think>\nanswer<|endoftext|>"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nhi\n<think>why</think>\nanswer"


def test_transformers_loads_folder_and_encodes_identically(folder: Path, tokenizer: Tokenizer) -> None:
    hf = AutoTokenizer.from_pretrained(str(folder))
    ids = special_token_ids(VOCAB_SIZE)
    assert len(hf) == tokenizer.get_vocab_size(with_added_tokens=True)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == ids["<|endoftext|>"]
    assert hf.pad_token_id == ids[PAD_TOKEN]
    for text in [*TEXTS, "[gMASK]<sop><|system|>\nbe brief<|user|>\n<tool_call>f\n</tool_call>/nothink"]:
        expected = tokenizer.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == expected
        assert hf.encode(text) == expected  # no post-processor: the chat template writes [gMASK]<sop>
        assert hf.decode(expected, skip_special_tokens=True) == tokenizer.decode(expected, skip_special_tokens=True)


def test_config_names_added_tokens_and_template(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = special_token_ids(VOCAB_SIZE)
    assert {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()} == ids
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False and config["do_lower_case"] is False
    assert config["chat_template"].count("'[gMASK]<sop>'") == 1


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_template_renders_glm45_format(folder: Path) -> None:
    """Exact strings for the format of GLM45.md §5, rendered by transformers itself."""
    hf = AutoTokenizer.from_pretrained(str(folder))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Weather in 北京?"},
        {
            "role": "assistant",
            "content": "<think>\nAsk the tool.\n</think>\nChecking.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2}}},
            ],
        },
        {"role": "tool", "content": '{"temp_c": 31}'},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "31 °C and sunny.", "reasoning_content": "\nRead the tools.\n"},
    ]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert rendered == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello!"
        "<|user|>\nWeather in 北京?<|assistant|>\n<think>Ask the tool.</think>\nChecking.\n<tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n"
        '</tool_call><|observation|>\n<tool_response>\n{"temp_c": 31}\n</tool_response>'
        "\n<tool_response>\nsunny\n</tool_response>"
        "<|assistant|>\n<think>Read the tools.</think>\n31 °C and sunny."
    )

    user = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\nhi<|assistant|>"
    )
    assert hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"
    )
    with_tools = hf.apply_chat_template(user, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert with_tools.startswith(
        "[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER_TOOL, ensure_ascii=False)
        + "\n</tools>\n\n"
    )
    assert with_tools.endswith("<arg_value>{arg-value-1}</arg_value>\n...\n</tool_call><|user|>\nhi<|assistant|>")
