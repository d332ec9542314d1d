"""`tandem generate` prints only the text on stdout (or a JSON object with --json), equal to the
engine's own greedy output; bad parameters exit 1 with the parameter named."""

from __future__ import annotations

import json

import pytest

from services.platform.cli.main import main as tandem_main
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


def test_generate_json_matches_engine(default_model_dir, store_root, capsys):
    argv = [
        "generate",
        "--store",
        str(store_root),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ]
    capsys.readouterr()
    assert tandem_main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_dir(default_model_dir)
    engine = LLMEngine.from_store(default_model_dir, EngineConfig())
    want = engine.generate(
        [tok.encode("The capital of France is")], SamplingParams(max_tokens=8, temperature=0)
    )[0]
    assert result["token_ids"] == want.output_token_ids
    assert result["text"] == tok.decode(want.output_token_ids, skip_special_tokens=True)
    assert tandem_main(argv) == 0
    assert capsys.readouterr().out == result["text"] + "\n"


def test_generate_chat_stops_at_end_of_turn(store_root, capsys):
    capsys.readouterr()
    argv = [
        "generate",
        "--store",
        str(store_root),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--json",
    ]
    assert tandem_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["finish_reason"] == "stop" and "Paris" in result["text"] and "<|im_end|>" not in result["text"]
    )


def test_generate_stop_string(store_root, capsys):
    argv = ["generate", "--store", str(store_root), "--chat", "--prompt", "What is the capital of France?"]
    capsys.readouterr()
    assert tandem_main([*argv, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["text"]
    stop = full.split()[2]
    assert tandem_main([*argv, "--json", "--stop", stop]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == full[: full.index(stop)]
    assert result["finish_reason"] == "stop" and result["stop_reason"] == stop


def test_generate_bad_parameter(store_root, capsys):
    assert tandem_main(["generate", "--store", str(store_root), "--prompt", "x", "--top-p", "0"]) == 1
    assert "top_p" in capsys.readouterr().err
    assert tandem_main(["generate", "--store", str(store_root), "--model", "nope", "--prompt", "x"]) == 1
    assert "model 'nope' is not in the store" in capsys.readouterr().err
