"""A throwaway Prometheus (Debian's `prometheus` package) on a free loopback port, for tests.

It discovers its targets over HTTP from the gateway's /dashboard/targets (the same http_sd config an
operator would use), scrapes every second, and keeps its data in a temporary directory.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import yaml

from tests.redis_server import free_port


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def start_prometheus(workdir: Path, targets_url: str, interval: str = "1s") -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a started Prometheus scraping what `targets_url` lists."""
    u = urlparse(targets_url)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "tandem",
                "http_sd_configs": [{"url": targets_url, "refresh_interval": "2s"}],
            }
        ],
    }
    assert u.scheme == "http"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")


def query(url: str, expr: str) -> dict:
    """The instant query's `data` (raises with Prometheus' error when the query does not parse)."""
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    if r["status"] != "success":
        raise ValueError(f"{expr}: {r.get('errorType')}: {r.get('error')}")
    return r["data"]
