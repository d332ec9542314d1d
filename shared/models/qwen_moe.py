"""Qwen2-MoE and Qwen3-MoE: fine-grained routed experts with softmax top-k routing, optional
renormalisation (`norm_topk_prob`), dense layers listed in `mlp_only_layers`, every
`decoder_sparse_step`-th layer sparse. Qwen2-MoE adds one shared expert whose output is scaled by
sigmoid(shared_expert_gate(x)); Qwen3-MoE has no shared expert but per-head qk RMSNorm.

Checkpoints call the shared expert `shared_expert` (singular).
"""

from shared.models.transformer import CausalLM


class QwenMoeForCausalLM(CausalLM):
    architectures = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    renames = ((r"\.mlp\.shared_expert\.", ".mlp.shared_experts."),)
