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
TANDEM_INTERNAL_TOKEN  the shared token every internal gRPC call carries and every server requires
TANDEM_TLS_CERT, TANDEM_TLS_KEY, TANDEM_TLS_CA  PEM files: TLS on every internal gRPC server and
                    channel (with the CA: mutual TLS); TANDEM_TLS_SERVER_NAME the certificate's name
TANDEM_GRPC_REFLECTION  1 turns gRPC server reflection on (off by default)
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


def kernel_cflags() -> list[str]:
    """Extra compiler flags for the CPU kernels after -march=native: `-mno-avx512f` builds and tests
    the AVX2 paths on an AVX-512 machine."""
    return os.environ.get("TANDEM_KERNEL_CFLAGS", "").split()


def controller_address() -> str | None:
    return os.environ.get("TANDEM_CONTROLLER") or None


def api_keys() -> list[str]:
    return [k.strip() for k in os.environ.get("TANDEM_API_KEYS", "").split(",") if k.strip()]


def redis_password() -> str | None:
    return os.environ.get("TANDEM_REDIS_PASSWORD") or None


def internal_token() -> str | None:
    return os.environ.get("TANDEM_INTERNAL_TOKEN") or None


def tls_files() -> tuple[str, str, str | None] | None:
    cert, key = os.environ.get("TANDEM_TLS_CERT"), os.environ.get("TANDEM_TLS_KEY")
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("TLS needs both TANDEM_TLS_CERT and TANDEM_TLS_KEY")
    return cert, key, os.environ.get("TANDEM_TLS_CA") or None


def tls_server_name() -> str | None:
    return os.environ.get("TANDEM_TLS_SERVER_NAME") or None


def grpc_reflection() -> bool:
    return os.environ.get("TANDEM_GRPC_REFLECTION", "").strip().lower() in ("1", "true", "yes", "on")


#: what every process of a platform must share for its gRPC plane (passed to Ray actors explicitly, so
#: a remote cluster's workers get them too)
SECURITY_VARS = ("TANDEM_INTERNAL_TOKEN", "TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA",
                 "TANDEM_TLS_SERVER_NAME", "TANDEM_GRPC_REFLECTION")  # fmt: skip


def security_env() -> dict[str, str]:
    return {k: os.environ[k] for k in SECURITY_VARS if os.environ.get(k)}
