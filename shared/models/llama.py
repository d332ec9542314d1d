"""Llama family: Llama 2 / 3 / 3.x (with the rope scaling their configs declare), SmolLM / SmolLM2,
and Mistral (Llama layers plus a sliding attention window, which ModelConfig carries).

The checkpoint layout is the reference layout of shared/models/layers.py, so nothing is renamed.
"""

from shared.models.transformer import CausalLM


class LlamaForCausalLM(CausalLM):
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")
