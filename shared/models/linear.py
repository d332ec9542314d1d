"""Linear: nn.Linear with a CPU kernel choice for the small-batch shapes that decoding produces.

Decoding multiplies a few activation rows by every weight matrix, so on CPU it is bound by how fast
the GEMM streams the weights. MKL does that much better when asked for W @ x^T (the weights as the
left operand, x^T as a transposed right operand) than for x @ W^T: measured on the 2-core dev box,
SmolLM2-135M's 211 projections take ~21 ms instead of ~32 ms for 1-2 rows and ~97 instead of
~115 ms for 32 rows; from ~128 rows on, plain F.linear is as fast or faster. A single row is
computed as two (MKL's GEMV path is the slow one). Same parameters, names and numerics as
nn.Linear (up to float summation order), so checkpoints, PEFT and autograd see an nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: at most this many rows take the weights-left path on CPU
SMALL_BATCH_ROWS = 64


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, contiguous: bool = True
) -> torch.Tensor:
    """F.linear(x, weight, bias). With contiguous=False the result may be a transposed view, which
    saves a copy when the consumer is elementwise (or an argmax) anyway."""
    rows = x.shape[0] if x.dim() == 2 else 0
    if not (x.device.type == "cpu" and 0 < rows <= SMALL_BATCH_ROWS and x.dtype == torch.float32):
        return F.linear(x, weight, bias)
    if rows == 1:
        out = torch.mm(weight, torch.cat((x, x)).t())[:, :1].t()
    else:
        out = torch.mm(weight, x.t()).t()
    if contiguous:
        out = out.contiguous()
    return out if bias is None else out + bias


class Linear(nn.Linear):
    #: A replacement GEMM (x, weight, bias, contiguous) -> output that a serving engine may set on an
    #: inference-only model (e.g. Tandem's compiled CPU kernels); used only under inference_mode.
    gemm = None
    #: (x, output) -> output with per-token LoRA deltas added (shared/models/lora.py LoraBank), or None
    lora = None

    def forward(self, x: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
        if self.gemm is not None and torch.is_inference_mode_enabled():
            out = self.gemm(x, self.weight, self.bias, contiguous)
        else:
            out = linear(x, self.weight, self.bias, contiguous)
        return out if self.lora is None else self.lora(x, out)
