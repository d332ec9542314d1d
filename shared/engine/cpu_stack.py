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

import torch

from shared.engine.paged_attention import PagedMetadata
from shared.models.layers import Attention, GatedMLP, RMSNorm
from shared.models.linear import SMALL_BATCH_ROWS, Linear, linear
from shared.models.transformer import CausalLM, DecoderLayer


class CpuStack:
    def __init__(self, model: CausalLM, ops, weights: list[torch.Tensor], windows: list[int]):
        self.model, self.ops, self.weights, self.windows = model, ops, weights, windows
        attn = model.model.layers[0].self_attn
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.eps = model.model.norm.eps

    @classmethod
    def build(cls, model: CausalLM, ops) -> CpuStack | None:
        """The stack for `model`, or None where the kernels would not compute its forward exactly."""
        if ops is None or type(model).forward is not CausalLM.forward:
            return None
        params = list(model.parameters())
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            return None
        body = model.model
        if type(body.embed_tokens) is not torch.nn.Embedding or type(body.norm) is not RMSNorm:
            return None
        if type(model).compute_logits is not CausalLM.compute_logits or type(model.lm_head) is not Linear:
            return None
        eps = body.norm.eps
        weights: list[torch.Tensor] = []
        windows: list[int] = []
        first = body.layers[0].self_attn
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (
                type(layer) is DecoderLayer
                and type(attn) is Attention
                and type(mlp) is GatedMLP
                and type(layer.input_layernorm) is RMSNorm
                and type(layer.post_attention_layernorm) is RMSNorm
                and layer.input_layernorm.eps == eps == layer.post_attention_layernorm.eps
                and attn.q_norm is None
                and type(attn.qkv_proj) is Linear
                and type(attn.o_proj) is Linear
                and type(mlp.gate_up_proj) is Linear
                and type(mlp.down_proj) is Linear
                and mlp.gate_up_proj.bias is None
                and mlp.down_proj.bias is None
                and (attn.num_heads, attn.scale) == (first.num_heads, first.scale)
            ):
                return None
            weights += [
                layer.input_layernorm.weight,
                attn.qkv_proj.weight,
                _or_empty(attn.qkv_proj.bias),
                attn.o_proj.weight,
                _or_empty(attn.o_proj.bias),
                layer.post_attention_layernorm.weight,
                mlp.gate_up_proj.weight,
                mlp.down_proj.weight,
            ]
            windows.append(attn.window or -1)
        return cls(model, ops, [w.detach() for w in weights], windows)

    @staticmethod
    def install_gemm(model: CausalLM, ops) -> None:
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head for a few rows by the skinny GEMM: [N, V], a transposed view."""
        head = self.model.lm_head
        logits = self.ops.skinny_linear(hidden, head.weight)
        return logits if head.bias is None else logits + head.bias

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: PagedMetadata,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Final-normed hidden states [T, C] of a step (the caches get the new K/V)."""
        model = self.model
        cos, sin = model.rotary.cos_sin(positions)
        chunks = meta.prefills
        width = max((len(c.table) for c in chunks), default=0)
        return self.ops.forward_layers(
            model.model.embed_tokens(input_ids),
            self.weights,
            model.model.norm.weight,
            cos,
            sin,
            k_caches,
            v_caches,
            meta.slots,
            meta.decode_rows,
            meta.decode_tables,
            meta.decode_lens,
            torch.tensor([c.start for c in chunks], dtype=torch.long),
            torch.tensor([c.num_queries for c in chunks], dtype=torch.long),
            torch.tensor([c.table + [0] * (width - len(c.table)) for c in chunks], dtype=torch.long).view(
                len(chunks), width
            ),
            torch.tensor([c.num_keys for c in chunks], dtype=torch.long),
            self.windows,
            self.num_heads,
            model.rotary.dim,
            self.scale,
            self.eps,
            SMALL_BATCH_ROWS,
        )


def _or_empty(bias: torch.Tensor | None) -> torch.Tensor:
    return bias if bias is not None else torch.empty(0)
