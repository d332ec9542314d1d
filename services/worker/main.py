"""The worker service's config and build: what `tandem serve worker` and the platform's actors start
(an engine for one model from the store, behind the Worker gRPC service)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.rpc.server import Running, ServiceConfig
from shared.store import DEFAULT_MODEL, ModelStore


@dataclass(frozen=True)
class Config(ServiceConfig):
    model: str = DEFAULT_MODEL
    store: str | None = None  # the model store (default $TANDEM_MODELS)
    role: str = "monolithic"  # monolithic | prefill | decode (how the router uses it)
    kvstore: str | None = None  # KV-cache store HOST:PORT (prefix reuse and handoffs)
    lease_ttl: float = 60.0  # seconds a handoff's blocks stay pinned in the store
    worker_id: str | None = None
    max_waiting: int = 256  # queue length beyond which requests are refused
    # the engine
    device: str = "cpu"
    dtype: str = "float32"
    kv_cache_dtype: str = "auto"  # the KV cache's element type (auto: the model's dtype)
    kv_cache_mb: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    speculative: str = "off"  # speculative decoding's default: off | ngram | draft
    num_speculative_tokens: int = 4
    draft_model: str | None = None  # the 'draft' method's model, by its store name
    int8_activations: bool = False  # quantized models: int8 activations, integer dot products (VNNI/AVX2)

    def engine_config(self):
        from shared.engine import EngineConfig

        draft = None
        if self.draft_model:
            store = ModelStore.at(self.store)
            draft = str(store.path(store.get(self.draft_model).name))
        return EngineConfig(
            device=self.device,
            dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            kv_cache_bytes=self.kv_cache_mb * 2**20,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            speculative=self.speculative,
            num_speculative_tokens=self.num_speculative_tokens,
            draft_model=draft,
            int8_activations=self.int8_activations,
        )

    def model_dir(self):
        store = ModelStore.at(self.store)
        return store.path(store.get(self.model).name)


async def build(cfg: Config, engine=None) -> Running:
    """`engine`: an LLMEngine built already (the leader of an expert-parallel group); else one is
    loaded from the store."""
    from services.worker.server import start_server

    server, service = await start_server(
        cfg.model_dir(), cfg.model, cfg.engine_config(), cfg.host, cfg.port, engine=engine,
        metrics_port=cfg.metrics_port, worker_id=cfg.worker_id, max_waiting=cfg.max_waiting, role=cfg.role,
        kvstore=cfg.kvstore, lease_ttl=cfg.lease_ttl,
    )  # fmt: skip
    return Running.grpc(server, service, service.close)
