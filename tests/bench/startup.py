"""Startup benchmark: `tandem up` with the default config to the first served token, and the
platform's resident memory.

    .venv/bin/python -m tests.bench.startup [--quick]

Runs `tandem up` (deploy/local.yaml, the gateway on a free port) as `make run` does, reads the time
from the launch to the first token it reports ("Tandem is ready in N s": it sends a one-token chat
request through the gateway before saying so), sums the resident memory (RSS) of every process the
platform runs — the `tandem up` driver, Ray's own processes and the service actors — then stops it
with `tandem down`. The baseline is the engine alone: loading the model and answering the same
one-token prompt in one process, with its RSS. Best (fastest) of --repeats (default 2; 1 with --quick).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from services.platform.deploy.config import DEFAULT_CONFIG
from tests.bench.common import emit, environment, log, model_path, parser


def tree_rss_mb(root_pid: int) -> float:
    """RSS of a process and its descendants, plus every Ray process (raylet, gcs_server, workers)."""
    children: dict[int, list[int]] = {}
    cmd: dict[int, str] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[int(d.name)] = int(line.split()[1])
            children.setdefault(ppid, []).append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    seen, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    seen |= {p for p, c in cmd.items() if "raylet" in c or "gcs_server" in c or "ray::" in c}
    return sum(rss.get(p, 0) for p in seen) / 1024


def platform_once(config: Path) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.platform.cli.main", "up", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    ready = None
    for line in proc.stdout:
        m = re.search(r"ready in ([\d.]+)s", line)
        if m:
            ready = time.perf_counter() - start
        if line.startswith("Ctrl-C"):
            break
    if ready is None:
        proc.kill()
        raise RuntimeError("tandem up did not become ready")
    time.sleep(2)  # let the idle Ray worker pool settle before measuring memory
    rss = tree_rss_mb(proc.pid)
    subprocess.run(
        [sys.executable, "-m", "services.platform.cli.main", "down"], capture_output=True, timeout=240
    )
    proc.wait(120)
    return ready, rss


def engine_once(path: Path) -> tuple[float, float]:
    code = (
        "import time,torch; t=time.perf_counter(); torch.set_num_threads(2)\n"
        "from shared.engine import LLMEngine, EngineConfig, SamplingParams\n"
        f"e=LLMEngine.from_store({str(path)!r}, EngineConfig())\n"
        "e.generate([e.tokenizer.encode_chat([{'role':'user','content':'Hi'}])], SamplingParams(max_tokens=1))\n"
        "rss=[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')][0]\n"
        "print(time.perf_counter()-t, rss/1024)\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    _, rss = map(float, out.split())
    return time.perf_counter() - start, rss


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    path = model_path(args)
    repeats = args.repeats or (1 if args.quick else 2)
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["gateway"]["port"] = 0
    cfg["model"] = args.model
    cfg["model_store"] = str(path.parent)
    config = Path(tempfile.mkdtemp(prefix="tandem-startup-")) / "local.yaml"
    config.write_text(yaml.safe_dump(cfg))
    best = (float("inf"), 0.0)
    engine = (float("inf"), 0.0)
    for i in range(repeats):
        engine = min(engine, engine_once(path))
        got = platform_once(config)
        log(
            f"  run {i}: platform {got[0]:.1f}s {got[1]:.0f} MB; engine alone {engine[0]:.1f}s {engine[1]:.0f} MB"
        )
        best = min(best, got)
    results = {
        "model": args.model,
        "config": "deploy/local.yaml (gateway port 0)",
        "seconds_to_first_token": round(best[0], 1),
        "resident_mb": round(best[1]),
        "engine_seconds_to_first_token": round(engine[0], 1),
        "engine_resident_mb": round(engine[1]),
        "ratio_seconds": round(best[0] / engine[0], 2),
        **environment(args),
    }
    emit(results)
    return results


if __name__ == "__main__":
    main()
