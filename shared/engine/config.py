"""EngineConfig: how an LLMEngine is sized and what it runs (cache, batching, dtypes, kernels, LoRA,
speculative decoding). Deploy configs and the CLI fill it; engine.py reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.core.dtypes import DTYPE_NAMES, torch_dtype


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # default: kv_cache_bytes / bytes per block
    kv_cache_bytes: int = 512 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_chunk: int = 512
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    # the KV cache's element type: "auto" (the model's dtype) or a dtype name; float16 halves the cache's
    # bytes (twice the tokens in kv_cache_bytes, half the bytes attention reads a step), its rows
    # rounded to float16 as they are written (vLLM's --kv-cache-dtype, llama.cpp's default f16 cache)
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    cpu_kernels: bool = True  # Tandem's compiled CPU kernels where they apply (shared/kernels)
    max_loras: int = 8  # LoRA adapters held at once (the least recently used idle one makes room)
    # quantized models on CPUs with AVX-512 VNNI or AVX2: 1-4 row GEMMs take activations as int8 (per 32
    # columns) and use integer dot products (llama.cpp's scheme; W4A8/W8A8 rather than weight-only)
    int8_activations: bool = False
    # speculative decoding (speculative.py): the default of requests that do not choose, drafts per
    # step, the draft model's directory (a store model with the same vocabulary) and prompt lookup's n
    speculative: str = "off"  # off | ngram | draft
    num_speculative_tokens: int = 4
    draft_model: str | None = None
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 3
    speculative_max_rows: int = 8  # drafts only while a step's decode rows + drafts stay within this

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got '{self.dtype}'")
        return torch_dtype(self.dtype)

    def kv_torch_dtype(self) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype()
        if self.kv_cache_dtype not in DTYPE_NAMES:
            raise ValueError(
                f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got '{self.kv_cache_dtype}'"
            )
        return torch_dtype(self.kv_cache_dtype)
