"""Mixtral: Llama attention (with Mistral's sliding window where configured) and a sparse MoE FFN of
`num_local_experts` SwiGLU experts, softmax top-k routing renormalised over the chosen k.

Checkpoints name the MoE `block_sparse_moe` with experts' w1 (gate), w3 (up), w2 (down).
"""

from shared.models.transformer import CausalLM


class MixtralForCausalLM(CausalLM):
    architectures = ("MixtralForCausalLM",)
    renames = (
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
        (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."),
        (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."),
    )
