"""DeepSeek-style MoE on standard GQA attention: fine-grained routed experts plus always-on shared
experts, sigmoid scoring with an auxiliary-loss-free correction bias that steers only the choice of
experts, group-limited top-k (n_group / topk_group), `routed_scaling_factor`, and the first
`first_k_dense_replace` layers dense. Served for `Dots1ForCausalLM` (rednote dots.llm1), which is
exactly the DeepSeek-V3 MoE with GQA attention and per-head qk RMSNorm.

DeepSeek-V2/V3 themselves also use Multi-head Latent Attention (MLA), which Tandem does not implement
yet: their checkpoints are rejected at import with that reason (see docs/models.md).
"""

from shared.models.transformer import CausalLM


class DeepseekMoeForCausalLM(CausalLM):
    architectures = ("Dots1ForCausalLM",)
