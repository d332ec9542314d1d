"""Shared fixtures. The default model is imported once per test session into a temporary store
(through the CLI, as a user would), and transformers' reference model is built from the very same
GGUF file, so every comparison is Tandem-from-store vs transformers-from-source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from services.platform.cli.main import main as tandem_main
from shared.store import BUILTIN, DEFAULT_MODEL, ModelStore
from tests.redis_server import start_redis

torch.set_num_threads(int(os.environ.get("TANDEM_TEST_THREADS", "2")))
# Ray Train's controller polls its workers every 2 s (taking each report, noticing the end): a tiny
# job's finish waits a few polls. Training jobs the tests start (and their subprocesses) poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report():
    """report(line): a measured figure to print in the test run's summary (max |Δlogit|, load time)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("measured figures")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def store(store_root) -> ModelStore:
    return ModelStore(store_root)


@pytest.fixture(scope="session")
def default_model_dir(store, store_root) -> Path:
    assert tandem_main(["models", "--store", str(store_root), "import", DEFAULT_MODEL]) == 0
    return store.path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return BUILTIN[DEFAULT_MODEL].locate()


@pytest.fixture(scope="session")
def hf_reference(default_gguf):
    """transformers' own model and tokenizer, loaded from the same GGUF (the correctness reference)."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(gguf_file=default_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, dtype=torch.float32, **kwargs
    )
    return model.eval(), tok


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, saving nothing to disk."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)
