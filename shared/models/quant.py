"""Weight-only quantization: Linear layers whose weights are stored as 8- or 4-bit integers.

A weight row is cut into groups of `group_size` inputs; each group keeps a float scale and offset:

    w[n, k] = q[n, k] * scale[n, g] + offset[n, g]        g = k // group_size

    bits 8   q int8 in [-127, 127], offset 0: symmetric; group_size = in_features is per channel
             (GGUF Q8_0 is group 32)
    bits 4   q unsigned in [0, 15], two per byte (low nibble: even k, high nibble: odd k); asymmetric
             (offset = the group's minimum, as GGUF Q4_1), or symmetric with offset = -8 * scale
             (GGUF Q4_0)

A quantized checkpoint stores, per quantized layer, `<name>.qweight`, `<name>.scales` and
`<name>.offsets` (floats [out, in / group_size]) in place of `<name>.weight`; its config.json says
`"quantization_config": {"quant_method": "tandem", "bits", "group_size", "head_bits", "head_group_size"}`
(group size 0: per channel; a Scheme). Which layers: the
decoder's projections and the LM head (embeddings, norms and MoE routers stay as they are).
QuantLinear computes with `gemm` when a serving engine installs one (shared/kernels dequantizes in
registers), else it dequantizes the weight for the call (the PyTorch fallback: correct anywhere,
slower than float weights on CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

METHOD = "tandem"
_SKIP = re.compile(
    r"(^|\.)(embed_tokens|mlp\.gate|norm)$"
)  # MoE routers decide, they are not weights to shrink


class QuantLinear(nn.Module):
    gemm = None  # (x, module, contiguous) -> output: a serving engine's kernel (inference only)
    lora = None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device=None, dtype=torch.float32):  # fmt: skip
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if group_size < 2 or in_features % group_size or (bits == 4 and group_size % 2):
            raise ValueError(f"group_size {group_size} must divide in_features {in_features} (and be even)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        cols = in_features if bits == 8 else in_features // 2
        qdtype = torch.int8 if bits == 8 else torch.uint8
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"

    def integers(self) -> torch.Tensor:
        """q as int32 [out, in]."""
        if self.bits == 8:
            return self.qweight.to(torch.int32)
        low = (self.qweight & 0x0F).to(torch.int32)
        high = (self.qweight >> 4).to(torch.int32)
        return torch.stack((low, high), dim=-1).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight [out, in] these integers stand for."""
        q = self.integers().reshape(self.out_features, -1, self.group_size).to(self.scales.dtype)
        w = q * self.scales[..., None] + self.offsets[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
        if self.gemm is not None and torch.is_inference_mode_enabled():
            out = self.gemm(x, self, contiguous)
        else:
            out = F.linear(x, self.dequantize().to(x.dtype), self.bias)
        return out if self.lora is None else self.lora(x, out)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int):
    """(qweight, scales, offsets) of a float weight [out, in] (round to nearest)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    # scales and offsets are rounded to float16 first (the CPU kernels read them so) and the integers
    # are chosen for the rounded values
    if bits == 8:
        scales = _half_exact((g.abs().amax(-1) / 127).clamp(min=2**-24))
        q = (g / scales[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        return q, scales, torch.zeros_like(scales)
    low, high = _half_exact(g.amin(-1)), g.amax(-1)
    scales = _half_exact(((high - low) / 15).clamp(min=2**-24))
    q = ((g - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    return pack_nibbles(q), scales, low


def _half_exact(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest float16, as float32."""
    return t.half().float()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0-15 -> [out, in / 2] bytes (even k in the low nibble)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_linear(linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
    q = QuantLinear(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                    device=linear.weight.device)  # fmt: skip
    qweight, scales, offsets = quantize_weight(linear.weight.detach(), bits, group_size)
    q.qweight.copy_(qweight)
    q.scales.copy_(scales)
    q.offsets.copy_(offsets)
    if linear.bias is not None:
        q.bias.data.copy_(linear.bias.detach())
    return q.requires_grad_(False)


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint is quantized: the projections' bits and group size (0: per channel), and the
    LM head's (8 bits by default: at 4 the head's rounding alone changes a small model's answers)."""

    bits: int
    group_size: int
    head_bits: int = 8
    head_group_size: int = 0

    def for_layer(self, name: str, in_features: int) -> tuple[int, int] | None:
        """(bits, group size) of a target layer, None when it stays float."""
        bits, group = (
            (self.head_bits, self.head_group_size) if name == "lm_head" else (self.bits, self.group_size)
        )
        group = group or in_features
        return (bits, group) if in_features % group == 0 else None

    def to_config(self) -> dict:
        return {"quant_method": METHOD, "bits": self.bits, "group_size": self.group_size,
                "head_bits": self.head_bits, "head_group_size": self.head_group_size}  # fmt: skip

    @classmethod
    def default(cls, bits: int, group_size: int | None = None) -> Scheme:
        """8 bits: per channel everywhere; 4 bits: groups of 32, the head 8 bits in groups of 32 (the
        layout of GGUF's Q4_1 / Q8_0 pair)."""
        if bits == 8:
            return cls(8, 0 if group_size is None else group_size, 8, 0 if group_size is None else group_size)
        return cls(4, 32 if group_size is None else group_size, 8, 32)


def targets(model: nn.Module, scheme: Scheme) -> dict[str, tuple[int, int]]:
    """The Linear modules a quantized checkpoint of `model` stores as integers: name -> (bits, group)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not _SKIP.search(name):
            layer = scheme.for_layer(name, m.in_features)
            if layer is not None:
                out[name] = layer
    return out


def quantize_model(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Replace the model's target Linears by QuantLinears (the LM head untied from the embeddings)."""
    for name, (bits, group) in targets(model, scheme).items():
        _replace(model, name, quantize_linear(model.get_submodule(name), bits, group))
    return model


def quantized_layout(model: nn.Module, scheme: Scheme) -> None:
    """Put empty QuantLinears where a quantized checkpoint's tensors go (on the meta device, to load)."""
    for name, (bits, group) in targets(model, scheme).items():
        m = model.get_submodule(name)
        _replace(model, name, QuantLinear(m.in_features, m.out_features, bits, group, m.bias is not None,
                                          device=m.weight.device))  # fmt: skip


def fuse(parts: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing the parts side by side (rows concatenate: each row has its groups)."""
    first = parts[0]
    fused = QuantLinear(first.in_features, sum(p.out_features for p in parts), first.bits, first.group_size,
                        first.bias is not None, device=first.qweight.device, dtype=first.scales.dtype)  # fmt: skip
    fused.qweight = torch.cat([p.qweight for p in parts])
    fused.scales = torch.cat([p.scales for p in parts])
    fused.offsets = torch.cat([p.offsets for p in parts])
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused.requires_grad_(False)


def config_of(raw: dict) -> Scheme | None:
    """The Scheme of a Tandem-quantized checkpoint's config.json, else None."""
    q = raw.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != METHOD:
        return None
    return Scheme(
        int(q["bits"]), int(q["group_size"]), int(q.get("head_bits", 8)), int(q.get("head_group_size", 0))
    )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
