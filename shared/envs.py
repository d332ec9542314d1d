"""The one place Tandem reads its environment. Everything else receives values from here or config.

TANDEM_HOME     root of Tandem's state (default: $XDG_CACHE_HOME/tandem or ~/.cache/tandem)
TANDEM_MODELS   the model store (default: $TANDEM_HOME/models)
TANDEM_THREADS  torch intra-op threads for this process (default: all cores, at most 2 per worker role)
TANDEM_CPU_KERNELS  0 turns Tandem's compiled CPU kernels off (default: on where they apply)
TANDEM_KERNEL_DIR   where the CPU kernels are built (default: $TANDEM_HOME/kernels)
TANDEM_CONTROLLER   the controller's HOST:PORT for `tandem train submit|list|get|logs|cancel`
TANDEM_API_KEYS     comma-separated bearer keys the gateway accepts, besides the config's (a Kubernetes
                    Secret mounted as an environment variable)
TANDEM_REDIS_PASSWORD  the password of the KV store's Redis tier (kept out of the config's URL)
"""

from __future__ import annotations

import os
from pathlib import Path


def tandem_home() -> Path:
    if os.environ.get("TANDEM_HOME"):
        return Path(os.environ["TANDEM_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tandem"


def models_dir() -> Path:
    if os.environ.get("TANDEM_MODELS"):
        return Path(os.environ["TANDEM_MODELS"]).expanduser()
    return tandem_home() / "models"


def torch_threads(default: int) -> int:
    value = os.environ.get("TANDEM_THREADS")
    return int(value) if value else default


def cpu_kernels_enabled() -> bool:
    return os.environ.get("TANDEM_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def kernels_dir() -> Path:
    if os.environ.get("TANDEM_KERNEL_DIR"):
        return Path(os.environ["TANDEM_KERNEL_DIR"]).expanduser()
    return tandem_home() / "kernels"


def controller_address() -> str | None:
    return os.environ.get("TANDEM_CONTROLLER") or None


def api_keys() -> list[str]:
    return [k.strip() for k in os.environ.get("TANDEM_API_KEYS", "").split(",") if k.strip()]


def redis_password() -> str | None:
    return os.environ.get("TANDEM_REDIS_PASSWORD") or None
