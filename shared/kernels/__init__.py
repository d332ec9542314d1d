"""Tandem's compiled CPU kernels (cpu_kernels.cpp), built on first use and registered as torch ops.

    from shared.kernels import cpu_ops
    ops = cpu_ops()          # torch.ops.tandem, or None where the kernels cannot be used

The kernels are compiled once per machine with the system C++ compiler through
torch.utils.cpp_extension (`make install` builds them ahead of time; `python -m shared.kernels`
does the same) into $TANDEM_KERNEL_DIR (default $TANDEM_HOME/kernels)/<hash of CPU, sources and
$TANDEM_KERNEL_CFLAGS>.
They are an optimisation only: when no compiler is there, the build fails, or TANDEM_CPU_KERNELS=0,
`cpu_ops()` returns None after one warning and callers run the PyTorch path, which gives the same
results (up to float summation order). They take float32 CPU tensors; GPU paths never call them.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path

import torch

from shared import envs

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEADERS = [Path(__file__).with_name(name) for name in ("skinny_gemm.h", "quant_gemm.h", "decode_step.h")]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    """The CPU's feature flags: kernels are built with -march=native, so a build is per CPU kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in (SOURCE, *HEADERS))
        + _cpu_signature().encode()
        + torch.__version__.encode()
        + " ".join(envs.kernel_cflags()).encode()
    ).hexdigest()[:16]
    return envs.kernels_dir() / digest


def cpu_ops():
    """torch.ops.tandem with the CPU kernels loaded, or None (disabled, or they failed to build)."""
    if not envs.cpu_kernels_enabled():
        return None
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops = None
        try:
            ops = _load()
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the PyTorch path
            log.warning("Tandem CPU kernels unavailable (%s); using the PyTorch path", exc)
        _state["ops"] = ops
        return ops


def _load():
    from torch.utils import cpp_extension

    directory = build_dir()
    name = "tandem_cpu_kernels"
    library, done = directory / f"{name}.so", directory / "built"
    if not done.exists():  # (the marker, not the .so: a concurrent build may be mid-link)
        directory.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-march=native", *envs.kernel_cflags(), "-fopenmp", "-DNDEBUG"]
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
        done.touch()
    else:
        torch.ops.load_library(str(library))
    return torch.ops.tandem
