"""The store's tokenizer (built from the GGUF by Tandem) encodes, decodes and renders chat prompts
exactly as transformers' tokenizer built from the same GGUF."""

from __future__ import annotations

import pytest

from shared.tokenizer import ChatTemplateError, Tokenizer

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world!",
    "",
    " leading space and trailing space ",
    "Unicode: café, naïve, Zürich, Ελληνικά, русский, 日本語, 한국어, עברית, العربية",
    "Emoji: 🚀🔥👍🏽 👨‍👩‍👧‍👦 🇫🇷 and a lone surrogate-free ✓",
    "def add(a, b):\n    return a + b  # comment\n\nclass X:\n\tpass\n",
    "Whitespace runs:    four spaces,\t\ttabs,\n\n\nnewlines,   \n  mixed  ",
    "Numbers 0 7 42 3.14159 1,000,000 2024-11-22 0x1F",
    "Special tokens inline: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<|im_start|><|im_start|>doubled<|im_end|>",
    "Punctuation!!! ??? ... --- ''' \"\"\" ``` {}[]()<>",
    "URLs https://example.com/a?b=c&d=e#frag and email someone@example.org",
    "Mixed scripts inline: abcабв123 中文English",
    "\u00a0non-breaking\u2009thin\u200bzero-width spaces",
    "a" * 300,
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "assistant", "content": "Arr, under the 🌴!"},
        {"role": "user", "content": "Which one?\nBe precise."},
    ],
    [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Second"},
        {"role": "user", "content": "Third with\ttabs and  spaces"},
    ],
]


@pytest.fixture(scope="module")
def tokenizers_pair(default_model_dir, hf_reference):
    return Tokenizer.from_dir(default_model_dir), hf_reference[1]


def test_encode_matches_transformers(tokenizers_pair):
    ours, hf = tokenizers_pair
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids


def test_decode_matches_transformers_and_round_trips(tokenizers_pair):
    ours, hf = tokenizers_pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == text  # byte-level BPE is lossless


def test_special_tokens(tokenizers_pair):
    ours, hf = tokenizers_pair
    assert ours.bos_token == hf.bos_token == "<|im_start|>"
    assert ours.eos_token == hf.eos_token == "<|im_end|>"
    assert ours.eos_token_id == hf.eos_token_id == 2
    assert ours.stop_token_ids == (2,)
    assert ours.vocab_size == len(hf)
    assert set(ours.special_ids) == set(hf.all_special_ids) | set(range(17))


def test_chat_template_renders_identically(tokenizers_pair):
    ours, hf = tokenizers_pair
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
        want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        want_ids = (
            want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
        )
        assert ours.encode_chat(messages) == list(want_ids)


def test_default_system_prompt_only_when_none_given(tokenizers_pair):
    ours, _ = tokenizers_pair
    text = ours.apply_chat_template([{"role": "user", "content": "x"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    text = ours.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "x"}])
    assert text.startswith("<|im_start|>system\nS<|im_end|>")


def test_broken_template_is_a_clear_error(default_model_dir):
    tok = Tokenizer.from_dir(default_model_dir)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{% for %}"
    with pytest.raises(ChatTemplateError, match="does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
