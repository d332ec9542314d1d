"""Helpers of the platform tests: run `tandem` commands, start a platform with a config, read its
status, find leftover processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def tandem(*args, timeout=120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.platform.cli.main", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def start_platform(cfg_file: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> dict:
    """`tandem up --config cfg_file [args]` in the background (with `env` added to the environment),
    once ready: {"url", "proc", "log"}."""
    log = open(cfg_file.parent / "up.log", "w")  # noqa: SIM115 - closed by stop_platform
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.platform.cli.main", "up", "--config", str(cfg_file), *args],
        stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = None
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if "API (OpenAI-compatible)" in line:
            url = line.split()[-1]
        if line.startswith("Ctrl-C") or time.monotonic() > deadline:
            break
    if url is None:
        proc.kill()
        pytest.fail(f"tandem up did not become ready; see {cfg_file.parent / 'up.log'}")
    return {"url": url, "proc": proc, "log": log}


def stop_platform(up: dict) -> None:
    if up["proc"].poll() is None:
        tandem("down")
        up["proc"].wait(60)
    up["log"].close()


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def status() -> dict:
    r = tandem("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def client(url):
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            out.append(pid)
        except ProcessLookupError:
            pass
    return out


def ray_processes() -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd:
                found.append(cmd[:80])
    return found
