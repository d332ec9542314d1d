"""`tandem serve` options: a YAML --config fills options the command line leaves at their defaults,
and a bad config or a missing address fails with a message naming the problem."""

from __future__ import annotations

import pytest

from services.platform.cli.main import build_parser, main
from services.platform.cli.serve import _apply_config


def test_config_file_fills_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "worker.yaml"
    cfg.write_text("max_num_seqs: 8\nkv-cache-mb: 64\nport: 5000\n")
    args = build_parser().parse_args(["serve", "worker", "--config", str(cfg), "--port", "6000"])
    _apply_config(args)
    assert (args.max_num_seqs, args.kv_cache_mb, args.port) == (8, 64, 6000)


def test_worker_kv_cache_dtype_reaches_the_engine_config():
    from services.worker.main import Config

    args = build_parser().parse_args(["serve", "worker", "--kv-cache-dtype", "float16"])
    assert args.kv_cache_dtype == "float16"
    assert Config(kv_cache_dtype=args.kv_cache_dtype).engine_config().kv_cache_dtype == "float16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "worker", "--kv-cache-dtype", "fp8"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("bogus_option: 1\n", "unknown option 'bogus_option'"),
        ("- a\n- b\n", "must be a mapping"),
        (":\n  - [", "cannot read"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["serve", "router", "--config", str(cfg), "--worker", "127.0.0.1:1"]) == 1
    assert message in capsys.readouterr().err


def test_router_without_workers_and_gateway_without_backends(capsys):
    assert main(["serve", "router"]) == 1
    assert "--worker" in capsys.readouterr().err
    assert main(["serve", "gateway"]) == 1
    assert "--tokenizer" in capsys.readouterr().err
