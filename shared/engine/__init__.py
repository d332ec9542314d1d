"""The engine shared by prefill and decode workers: paged KV cache with prefix caching, a
continuous-batching scheduler with chunked prefill and preemption, a model runner and a sampler;
synchronous (LLMEngine) and asyncio (AsyncLLMEngine) front ends; KV handoff for disaggregation."""

from shared.core.sampling_params import SamplingParams
from shared.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from shared.engine.engine import EngineConfig, LLMEngine, RequestOutput
from shared.engine.kv_transfer import KVHandoff

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineDeadError",
    "KVHandoff",
    "LLMEngine",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
]
