"""`tandem chat` streams replies turn by turn, keeps the conversation, and handles /reset and /exit;
its greedy replies equal the engine's for the same conversation."""

from __future__ import annotations

import io

import pytest

from services.platform.cli.main import main as tandem_main
from shared.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.slow


def test_chat_streams_a_conversation(default_model_dir, store_root, capsys, monkeypatch):
    turns = [
        "What is the capital of France?",
        "And of Germany?",
        "/reset",
        "Name a color.",
        "/exit",
        "ignored",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    capsys.readouterr()
    argv = ["chat", "--store", str(store_root), "--temperature", "0", "--max-tokens", "48"]
    assert tandem_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()

    engine = LLMEngine.from_store(default_model_dir, EngineConfig())
    tok, params = engine.tokenizer, SamplingParams(max_tokens=48, temperature=0)
    history, want = [], []
    for text in turns[:4]:
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        reply = engine.generate([tok.encode_chat(history)], params)[0].text
        history.append({"role": "assistant", "content": reply})
        want.append(reply)
    assert "\n".join(printed) == "\n".join(want)
    assert "Paris" in want[0] and "Berlin" in want[1]


def test_chat_rejects_bad_sampling_flags(store_root, capsys):
    assert tandem_main(["chat", "--store", str(store_root), "--temperature", "-1"]) == 1
    assert "temperature" in capsys.readouterr().err
