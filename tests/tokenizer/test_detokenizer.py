"""The incremental detokenizer streams exactly the text a full decode gives, never half a character,
and applies stop strings across token boundaries the way vLLM does."""

from __future__ import annotations

import pytest

from shared.engine import SamplingParams
from shared.tokenizer import Tokenizer
from shared.tokenizer.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is a plain sentence.",
    "Emoji 🎉🚀 and accents: café, naïve, Ærøskøbing.",
    "中文字符和日本語のテキスト、한국어도.",
    "  leading spaces, tabs\tand\nnew lines  ",
]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def stream(tok, ids, params=SamplingParams(), prompt=(), stop_terminated=False):
    """Feed ids one at a time; returns (the deltas, the stop string, the detokenizer)."""
    detok = IncrementalDetokenizer(tok, list(prompt), params)
    deltas, stop = [], None
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        stop = detok.update([t], stop_terminated and last)
        deltas.append(detok.next_text(finished=last or stop is not None))
        if stop is not None:
            break
    return deltas, stop, detok


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_and_never_splits_a_character(tok, text):
    prompt = tok.encode("Say something:")
    ids = tok.encode(text, add_special_tokens=False)
    deltas, _, detok = stream(tok, ids, prompt=prompt)
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_waits_for_its_last_byte(tok):
    ids = tok.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    deltas, _, _ = stream(tok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🎉"


def test_stop_string_across_tokens(tok):
    text = "The answer is forty-two, and that is final."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "forty-two"
    assert all(stop not in tok.decode([t]) for t in ids), "the stop string must span tokens"
    deltas, found, detok = stream(tok, ids, SamplingParams(stop=(stop,)))
    assert found == stop and detok.text == "The answer is " and "".join(deltas) == detok.text
    # streamed text never showed a prefix of the stop string that was later retracted
    assert not any("forty" in d for d in deltas)
    deltas, found, detok = stream(tok, ids, SamplingParams(stop=(stop,), include_stop_str_in_output=True))
    assert found == stop and detok.text == "The answer is forty-two" and "".join(deltas) == detok.text


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("one two three four", add_special_tokens=False)
    _, found, detok = stream(tok, ids, SamplingParams(stop=("four", "two")))
    assert found == "two" and detok.text == "one "


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("stop here, then stop again", add_special_tokens=False)
    _, found, detok = stream(tok, ids, SamplingParams(stop=("stop",), min_tokens=3, max_tokens=16))
    assert found == "stop" and detok.text == "stop here, then "


def test_special_tokens_and_the_terminating_eos(tok):
    ids = tok.encode("Hi<|im_end|>there<|im_end|>", add_special_tokens=False)
    assert ids.count(tok.eos_token_id) == 2
    _, _, detok = stream(tok, ids, stop_terminated=True)
    assert detok.text == "Hithere"
    _, _, detok = stream(tok, ids, SamplingParams(skip_special_tokens=False), stop_terminated=True)
    assert detok.text == "Hi<|im_end|>there"  # the EOS that ended the request adds no text
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    _, _, detok = stream(tok, ids, params, stop_terminated=True)
    assert detok.text == "Hi<|im_end|>there<|im_end|>"
