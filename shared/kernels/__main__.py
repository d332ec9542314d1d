"""python -m shared.kernels: build (or find) the CPU kernels and say where they are."""

import logging
import sys

from shared.kernels import build_dir, cpu_ops

logging.basicConfig(level=logging.INFO)
if cpu_ops() is None:
    print("Tandem CPU kernels: not available (the PyTorch path will be used)", file=sys.stderr)
else:
    print(f"Tandem CPU kernels: {build_dir()}", file=sys.stderr)
