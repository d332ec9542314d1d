"""Helpers shared by the benchmark scripts: argument parsing, the model under test, timing, output.

Every benchmark measures Tandem and its baseline in the same process, alternating them, and keeps
the best of its repetitions for each side: these machines are shared and noisy, so a ratio taken in
one run means more than any absolute figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shared import envs
from shared.store import DEFAULT_MODEL, ModelStore


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--store", type=Path, default=None, help="model store (default: $TANDEM_HOME/models)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions per measurement, best kept")
    return p


def model_path(args) -> Path:
    """The model's store directory; the built-in default model is imported on first use."""
    store = ModelStore(args.store or envs.models_dir())
    if not store.has(args.model):
        log(f"importing {args.model} into {store.root} ...")
        store.import_builtin(args.model)
    return store.path(args.model)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of `repeats` timed calls of each, taking turns: a noisy spell on a shared machine
    slows every side's one call rather than all of one side's."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second that one `copy_` of a large fp32 tensor moves (each byte read once)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return nbytes / best_time(lambda: dst.copy_(src), repeats)


def read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second that summing a large fp32 tensor reads (a read-only stream)."""
    src = torch.ones(nbytes // 4)
    src.sum()
    return nbytes / best_time(lambda: src.sum(), repeats)


def environment(args) -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "quick": bool(args.quick),
    }


def emit(results: dict) -> None:
    """Human-readable lines on stderr, then the results as one JSON object on the last stdout line."""
    for key, value in results.items():
        log(f"  {key:34s} {value}")
    print(json.dumps(results), flush=True)


def quantiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    v = sorted(values)
    return v[len(v) // 2], v[min(len(v) - 1, int(len(v) * 0.9))]


class Processes:
    """Platform services as `tandem serve` processes (torch threads each: `threads`), each announcing
    its port in a file; start() returns its HOST:PORT, down() stops them all."""

    def __init__(self, threads: int):
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.threads = threads

    def start(self, name: str, *args: str) -> str:
        port_file = self.dir / f"{name}-{len(self.procs)}.port"
        cmd = [
            sys.executable,
            "-m",
            "services.platform.cli.main",
            "serve",
            name,
            "--port-file",
            str(port_file),
            *args,
        ]
        env = {**os.environ, "TANDEM_THREADS": str(self.threads)}
        logf = open(self.dir / f"{name}-{len(self.procs)}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text()):
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see the logs in {self.dir}")
            time.sleep(0.1)
        return f"127.0.0.1:{port_file.read_text()}"

    def down(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
