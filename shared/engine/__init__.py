"""The engine shared by prefill and decode workers: paged KV cache with prefix caching, a
continuous-batching scheduler with chunked prefill and preemption, a model runner and a sampler."""

from shared.engine.engine import EngineConfig, LLMEngine, RequestOutput
from shared.engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
