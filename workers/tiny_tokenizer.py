"""Tokenizer files for tiny GLM-4.5-architecture checkpoints.

A tiny checkpoint needs a tokenizer that behaves like GLM-4.5's (byte-level BPE, the same special
tokens in the same order, the same chat format) but is small enough that a model with a few hundred
embedding rows can use it. This module trains one on a built-in corpus and writes the two files a
checkpoint folder carries, ``tokenizer.json`` and ``tokenizer_config.json``, so that both
``cluster.tokenizer.Tokenizer`` and transformers' ``AutoTokenizer`` load the folder.

The output depends only on ``vocab_size``: the corpus is fixed, the trainer is deterministic (the
tests check this across processes and hash seeds), and both files are serialised in a fixed order,
so the same call gives byte-identical files.

Token choice (GLM45.md §5): the GLM-4 control tokens (``<|endoftext|>`` … ``<|end_of_video|>``) are
special added tokens, removed by ``decode(skip_special_tokens=True)``. The reasoning and tool-call
markers (``<think>`` … ``</arg_value>``, ``/nothink``) are added tokens that are *not* special, as in
the GLM-4 family's published tokenizer files (GLM45.md leaves this open): they stay single tokens, yet
survive a skip-special decode so that the reasoning and tool-call parsers can find them in the text.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# GLM-4's control tokens, in GLM's id order (151329 … 151342 in the official tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
# Reasoning and tool-call markers: single tokens, but kept by a skip-special decode.
MARKUP_TOKENS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
)
PAD_TOKEN = "<|endoftext|>"
# The model ends a turn with any of these (GLM45.md §5): config.json's eos_token_id lists all three.
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
MODEL_MAX_LENGTH_TOKENS = 131072
NUM_BYTE_TOKENS = 256

CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts chosen by a gate, so the model is large but each step reads only a small part of it.
Attention uses grouped query heads; the key and value caches are stored in blocks of sixteen tokens.
User: What is the capital of France? Assistant: The capital of France is Paris.
User: Write a function that adds two numbers. Assistant: Here is one in Python.
Please call the weather tool for the city and report the temperature in degrees Celsius.
The server streams text back to the client one token at a time, and stops at the end of turn.

def add(a: int, b: int) -> int:
    \"\"\"Return the sum of a and b.\"\"\"
    return a + b


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def step(self, amount: int = 1) -> int:
        self.count += amount
        return self.count


for index, value in enumerate([3, 1, 4, 1, 5, 9, 2, 6]):
    if value % 2 == 0:
        print(f"{index}: {value} is even")
    else:
        print(f"{index}: {value} is odd")

{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;
for (int i = 0; i < n; ++i) { sum += x[i] * w[i]; }

Un café au lait, s'il vous plaît. Le garçon a mangé une crème brûlée à côté de la fenêtre.
Él está en la señal de la montaña; mañana vamos a la ciudad. ¿Dónde está la estación?
Die Brücke über den Fluss ist schön, und die Straße führt nach Köln und München.
Привет, как дела? Москва — столица России. Спасибо за помощь.
北京是中国的首都。今天天气很好，我们去公园散步吧。上海和北京都是大城市。
東京は日本の首都です。こんにちは、元気ですか。ありがとうございます。
서울은 한국의 수도입니다. 안녕하세요, 감사합니다.
مرحبا بالعالم. القاهرة مدينة كبيرة.
नमस्ते दुनिया। दिल्ली भारत की राजधानी है।
Emoji: 😀 🚀 🎉 👍 ❤️ 🌍 🐍 🔥 ✨ 🤖 — the weather is ☀️ today, tomorrow 🌧️.
Math: α + β = γ, ∑ xᵢ ≤ ∞, 3 × 4 = 12, 10 ÷ 2 = 5, π ≈ 3.14159, √2 ≈ 1.414.
Prices: 5 €, 3 £, 100 ¥, 20 $. Temperatures: −5 °C to 30 °C.
"""


def _train(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with every byte and GLM's added tokens, at most ``vocab_size`` ids in all."""
    num_added = len(SPECIAL_TOKENS) + len(MARKUP_TOKENS)
    if vocab_size < NUM_BYTE_TOKENS + num_added:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the tokenizer needs {NUM_BYTE_TOKENS} byte tokens "
            f"and {num_added} added tokens, so vocab_size must be at least {NUM_BYTE_TOKENS + num_added}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tokenizer


# Written for moecluster from the format in GLM45.md §5. Every piece of output comes from an
# expression and every tag trims the whitespace around it, so the template's own layout adds nothing
# and renders the same with or without trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = r"""
{%- macro visible_text(content) -%}
  {%- if content is string -%}
    {{- content -}}
  {%- elif content is iterable and content is not mapping -%}
    {%- for part in content -%}
      {%- if part is string -%}
        {{- part -}}
      {%- elif part is mapping and part.type == 'text' -%}
        {{- part.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set thinking_off = enable_thinking is defined and not enable_thinking -%}
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
  {{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}
  {%- for tool in tools -%}
    {{- tool | tojson(ensure_ascii=False) ~ '\n' -}}
  {%- endfor -%}
  {{- '</tools>\n\nFor each function call, output the function name and arguments within the following XML format:' -}}
  {{- '\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n...' -}}
  {{- '\n</tool_call>' -}}
{%- endif -%}
{%- set turn = namespace(last_user=-1) -%}
{%- for message in messages -%}
  {%- if message.role == 'user' -%}
    {%- set turn.last_user = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- if message.role == 'system' -%}
    {{- '<|system|>\n' ~ visible_text(message.content) -}}
  {%- elif message.role == 'user' -%}
    {{- '<|user|>\n' ~ visible_text(message.content) -}}
    {%- if thinking_off -%}
      {{- '/nothink' -}}
    {%- endif -%}
  {%- elif message.role == 'assistant' -%}
    {%- set content = visible_text(message.content) -%}
    {%- set reasoning = '' -%}
    {%- if message.reasoning_content is string -%}
      {%- set reasoning = message.reasoning_content -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
      {%- set content = content.split('</think>')[-1] -%}
    {%- endif -%}
    {{- '<|assistant|>' -}}
    {%- if loop.index0 > turn.last_user and reasoning.strip() -%}
      {{- '\n<think>' ~ reasoning.strip() ~ '</think>' -}}
    {%- else -%}
      {{- '\n<think></think>' -}}
    {%- endif -%}
    {%- if content.strip() -%}
      {{- '\n' ~ content.strip() -}}
    {%- endif -%}
    {%- for call in message.tool_calls or [] -%}
      {%- set function = call.function if call.function is defined else call -%}
      {%- if function.arguments is string -%}
        {{- raise_exception('tool call ' ~ function.name ~ ': arguments must be a mapping, not a JSON string') -}}
      {%- endif -%}
      {{- '\n<tool_call>' ~ function.name ~ '\n' -}}
      {%- for key, value in (function.arguments or {}).items() -%}
        {{- '<arg_key>' ~ key ~ '</arg_key>\n<arg_value>' -}}
        {{- value if value is string else value | tojson(ensure_ascii=False) -}}
        {{- '</arg_value>\n' -}}
      {%- endfor -%}
      {{- '</tool_call>' -}}
    {%- endfor -%}
  {%- elif message.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' -%}
      {{- '<|observation|>' -}}
    {%- endif -%}
    {{- '\n<tool_response>\n' ~ visible_text(message.content) ~ '\n</tool_response>' -}}
  {%- else -%}
    {{- raise_exception('message ' ~ loop.index0 ~ ' has unknown role ' ~ message.role) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|>' -}}
  {%- if thinking_off -%}
    {{- '\n<think></think>' -}}
  {%- endif -%}
{%- endif -%}
""".strip()


def build_tokenizer_files(vocab_size: int) -> dict[str, str]:
    """The text of ``tokenizer.json`` and ``tokenizer_config.json`` (file name -> content).

    The tokenizer has at most ``vocab_size`` ids (fewer when the corpus runs out of merges); the
    model's embedding may be larger, as the official checkpoint's is.
    """
    tokenizer = _train(vocab_size)
    added = {tokenizer.token_to_id(t): t for t in SPECIAL_TOKENS + MARKUP_TOKENS}
    config = {
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": content in SPECIAL_TOKENS,
            }
            for token_id, content in sorted(added.items())
        },
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": MODEL_MAX_LENGTH_TOKENS,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """The id of every added token (special and markup) in the tokenizer ``build_tokenizer_files`` makes.

    The checkpoint maker sets ``pad_token_id`` to the id of ``PAD_TOKEN`` and ``eos_token_id`` to the
    ids of ``EOS_TOKENS``.
    """
    tokenizer = _train(vocab_size)
    return {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}
