"""CpuStack: a whole engine step of a dense model in one call to the compiled CPU kernels.

On CPU the PyTorch forward of a step spends, besides the GEMMs, ~50 op dispatches per layer, a
gather of every decode's KV into a padded batch, and several memory passes per elementwise op of a
prefill chunk. `tandem::forward_layers` (shared/kernels) runs the same layer sequence — RMSNorm,
fused qkv GEMM, RoPE + KV write, attention (paged decode attention for one-token rows, causal chunk
attention over the blocks for prefill chunks), o GEMM, residual + RMSNorm, fused gate/up GEMM,
SiLU * up, down GEMM, residual — for every layer in one call, reading the model's own (fused)
weights. The model files are untouched; this module only reads them.

Used only where it computes exactly what the model's forward does: float32 on CPU, the stock
`CausalLM` / `DecoderLayer` / `Attention` / `GatedMLP` forwards with fused projections, no per-head
q/k norm, no MLP biases, plain `Linear` modules (no adapters injected). Anything else (MoE
layers, GPU, bf16, a family that overrides a forward) returns None from `build` and runs the PyTorch
path, which the engine's tests compare it against.
"""

from __future__ import annotations

import weakref

import torch

from shared.engine.paged_attention import PagedMetadata
from shared.models.layers import Attention, GatedMLP, RMSNorm
from shared.models.linear import SMALL_BATCH_ROWS, Linear, linear
from shared.models.quant import QuantLinear
from shared.models.transformer import CausalLM, DecoderLayer


class CpuStack:
    def __init__(self, model: CausalLM, ops, stack: int, int8_x: bool = False):
        self.model, self.ops, self.int8_x = model, ops, int8_x
        # the weights, caches and constants, handed to the kernels once (make_stack): a step passes
        # the handle and its index tensors (as lists, the ~540 tensors cost ~0.25 ms a step)
        self.stack = stack
        weakref.finalize(self, ops.free_stack, stack)
        self._cos_sin_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._no_chunks = tuple(torch.empty(0, dtype=torch.long) for _ in range(3)) + (
            torch.empty(0, 0, dtype=torch.long),
        )

    @classmethod
    def build(
        cls,
        model: CausalLM,
        ops,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        int8_x: bool = False,
    ) -> CpuStack | None:
        """The stack for `model` over the runner's KV caches (a step writes its new keys and values
        there), or None where the kernels would not compute its forward exactly.
        `int8_x`: quantized projections take x as int8 (per 32 columns) for 1-4 rows, where the CPU has
        integer dot products — faster, no longer the dequantized model's exact arithmetic."""
        if ops is None or type(model).forward is not CausalLM.forward:
            return None
        params = list(model.parameters())
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            return None
        body = model.model
        if type(body.embed_tokens) is not torch.nn.Embedding or type(body.norm) is not RMSNorm:
            return None
        if type(model).compute_logits is not CausalLM.compute_logits or not _plain(model.lm_head):
            return None
        eps, first = body.norm.eps, body.layers[0].self_attn
        if not all(_stack_layer(layer, first, eps) for layer in body.layers):
            return None
        stack = ops.make_stack(
            [w.detach() for layer in body.layers for w in _layer_weights(layer)],
            body.embed_tokens.weight.detach(),
            body.norm.weight.detach(),
            [w.detach() for w in _with_bias(model.lm_head)],
            k_caches,
            v_caches,
            [layer.self_attn.window or -1 for layer in body.layers],
            first.num_heads,
            model.rotary.dim,
            first.scale,
            eps,
            int8_x,
        )
        return cls(model, ops, stack, int8_x)

    @staticmethod
    def install_gemm(model: CausalLM, ops, int8_x: bool = False) -> None:
        """Route the model's float32 CPU `Linear` layers through the kernels' GEMMs (inference only):
        the skinny GEMM up to 64 rows, the blocked one beyond (prefill chunks)."""

        def gemm(x, weight, bias, contiguous):
            if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or not x.shape[0]:
                return linear(x, weight, bias, contiguous)
            if x.shape[0] <= SMALL_BATCH_ROWS:
                out = ops.skinny_linear(x, weight)
                out = out if bias is None else out + bias
                return out.contiguous() if contiguous else out
            return ops.gemm_rows(x, weight, bias)

        for module in model.modules():
            if (
                type(module) is Linear
                and module.weight.dtype == torch.float32
                and module.weight.is_contiguous()
            ):
                module.gemm = gemm
            elif isinstance(module, QuantLinear) and module.scales.dtype == torch.float32:
                # the LM head keeps float x: its rounding lands on the logits directly (it flipped
                # SmolLM2's first answer token where the layers' did not)
                module.gemm = quant_gemm(ops, module, int8_x and module is not model.lm_head)

    def logits(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        last_position: int,
        meta: PagedMetadata,
        sample_rows: list[int] | None = None,
    ) -> torch.Tensor:
        """A step's logits [S, V] for rows `sample_rows` (all where None; the caches get the new K/V).
        `last_position`: the largest of `positions`. A step of decodes computes the LM head on the
        layers' thread team, in the same call."""
        cos, sin, rows = self._rope_rows(positions, last_position)
        chunks = meta.prefills
        if chunks:
            width = max(len(c.table) for c in chunks)
            prefill = (
                torch.tensor([c.start for c in chunks], dtype=torch.long),
                torch.tensor([c.num_queries for c in chunks], dtype=torch.long),
                torch.tensor([c.num_keys for c in chunks], dtype=torch.long),
                torch.tensor([c.table + [0] * (width - len(c.table)) for c in chunks], dtype=torch.long),
            )
        else:
            prefill = self._no_chunks
        starts, queries, keys, tables = prefill
        return self.ops.forward_layers(
            self.stack,
            input_ids,
            cos,
            sin,
            rows,
            meta.slots,
            meta.decode_rows,
            meta.decode_tables,
            meta.decode_lens,
            starts,
            queries,
            tables,
            keys,
            SMALL_BATCH_ROWS,
            True,
            None if sample_rows is None else torch.tensor(sample_rows, dtype=torch.long),
        )

    def _rope_rows(
        self, positions: torch.Tensor, last: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE's cos, sin tables [P, R/2] and each token's row in them: a table of positions
        0..2^k-1, grown to the longest sequence seen, with the positions as rows (the ~8 ops that
        compute cos and sin cost ~0.15 ms a step, a twentieth of a one-token step). Where the
        frequencies depend on the length (dynamic NTK), the tokens' own cos and sin, rows 0..T-1."""
        rotary = self.model.rotary
        if rotary.rope.rope_type == "dynamic":
            cos, sin = rotary.cos_sin(positions)
            return cos, sin, torch.arange(positions.numel())
        if self._cos_sin_table is None or last >= self._cos_sin_table[0].shape[0]:
            size = 1 << max(10, last.bit_length())
            self._cos_sin_table = rotary.cos_sin(torch.arange(size))
        cos, sin = self._cos_sin_table
        return cos, sin, positions


def _stack_layer(layer, first: Attention, eps: float) -> bool:
    """Whether the kernels compute `layer` exactly: the stock decoder layer, plain projections, no
    per-head q/k norm, no MLP biases, the first layer's heads and norm epsilon."""
    attn, mlp = layer.self_attn, layer.mlp
    return (
        type(layer) is DecoderLayer
        and type(attn) is Attention
        and type(mlp) is GatedMLP
        and type(layer.input_layernorm) is RMSNorm
        and type(layer.post_attention_layernorm) is RMSNorm
        and layer.input_layernorm.eps == eps == layer.post_attention_layernorm.eps
        and attn.q_norm is None
        and all(_plain(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        and mlp.gate_up_proj.bias is None
        and mlp.down_proj.bias is None
        and (attn.num_heads, attn.scale) == (first.num_heads, first.scale)
    )


def _layer_weights(layer) -> list[torch.Tensor]:
    """A layer's 16 tensors in make_stack's order (cpu_kernels.cpp's LayerStack)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [
        layer.input_layernorm.weight,
        *_with_bias(attn.qkv_proj),
        *_with_bias(attn.o_proj),
        layer.post_attention_layernorm.weight,
        *_weight(mlp.gate_up_proj),
        *_weight(mlp.down_proj),
    ]


def _with_bias(m) -> list[torch.Tensor]:
    """[weight, bias, scales, offsets] (an empty tensor for an absent bias)."""
    weight, scales, offsets = _weight(m)
    return [weight, _or_empty(m.bias), scales, offsets]


def _or_empty(bias: torch.Tensor | None) -> torch.Tensor:
    return bias if bias is not None else torch.empty(0)


def _plain(m) -> bool:
    """A projection the stack computes: a float32 Linear, or a QuantLinear (integers and float32 scales)."""
    return type(m) is Linear or (
        type(m) is QuantLinear and m.scales.dtype == torch.float32 and m.lora is None
    )


def _weight(m) -> list[torch.Tensor]:
    """[weight, scales, offsets] as forward_layers takes them (empty scales for a float weight)."""
    if isinstance(m, QuantLinear):
        return [m.qweight, *_half_scales(m)]
    empty = torch.empty(0)
    return [m.weight, empty, empty]


def _half_scales(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 copies of a layer's scales and offsets for the kernels: a sixth fewer bytes per 4-bit
    weight to stream. Exact for GGUF's (stored as float16) and for `tandem models quantize`'s (rounded
    to float16 when made)."""
    return m.scales.detach().half(), m.offsets.detach().half()


def quant_gemm(ops, module: QuantLinear, int8_x: bool = False):
    """A QuantLinear's GEMM on the kernels (quant_gemm.h: integers converted in registers for 1-4 rows,
    blocks of rows converted into cache for more), or dequantized for the call where its groups do not
    fit the kernels' vectors."""
    vector = 16 if module.bits == 4 else 8  # the kernel's group granularity (covers AVX2 and AVX-512)
    usable = module.group_size % (2 * vector) == 0 and module.in_features % module.group_size == 0
    scales, offsets = _half_scales(module)

    def gemm(x, _module, contiguous):
        rows = x.shape[0] if x.dim() == 2 else 0
        floats = x.dtype == torch.float32 and x.device.type == "cpu"
        if usable and floats and rows:
            out = ops.quant_linear(x, module.qweight, scales, offsets, module.bits, module.group_size, int8_x)
        else:
            weight = module.dequantize()
            if not (floats and rows):
                return linear(x, weight, module.bias, contiguous)
            if rows > SMALL_BATCH_ROWS:
                return ops.gemm_rows(x, weight, module.bias)
            out = ops.skinny_linear(x, weight)
        out = out if module.bias is None else out + module.bias
        return out.contiguous() if contiguous else out

    return gemm
