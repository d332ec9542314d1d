"""The deployment config of `tandem up`: which services run, how many, with what resources.

    model: smollm2-135m-instruct
    prefill_workers: 1
    decode_workers: 1
    router: {policy: prefix_aware, disagg_threshold: 256, balance_threshold: 4}
    kvstore: {memory_mb: 1024, redis_url: null}
    gateway: {host: 127.0.0.1, port: 8000, api_keys: []}
    training: {enabled: true, cpus: 1, gpus: 0, job_store: null}   # the training-job controller
    resources:
      prefill: {num_cpus: 1, num_gpus: 0, threads: 2}
      ...

`load_config(path)` reads YAML into a DeploymentConfig (frozen pydantic models, like the training
job spec, strict about types), filling defaults; every problem (an unknown key, a wrong type, a
negative count, an unreachable Redis, a missing model) is a ConfigError whose message names the
field, e.g. `decode_workers: Input should be greater than or equal to 0`. The platform controller
turns each section into the config of the service it describes (services/<kind>/main.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.router.placement import DEFAULT_POLICY, POLICIES
from shared.core.dtypes import DTYPE_NAMES
from shared.core.errors import field_problems

ROLES = ("tokenizer", "kvstore", "router", "gateway", "controller", "prefill", "decode", "monolithic")
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "local.yaml"
Policy = Literal[POLICIES]
DType = Literal[tuple(DTYPE_NAMES)]


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Resources(_Section):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int = Field(1, ge=1, description="torch intra-op threads in the actor")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources, e.g. {tandem-gateway: 1}"
    )


class RouterSection(_Section):
    policy: Policy = DEFAULT_POLICY
    disagg_threshold: int = Field(256, ge=0)
    balance_threshold: int = Field(4, ge=0)
    health_interval: float = Field(1.0, gt=0)
    max_inflight: int = Field(
        1024, ge=1, description="requests forwarded at once; beyond: 429 (admission control)"
    )


class KVStoreSection(_Section):
    memory_mb: int = Field(1024, ge=0)
    redis_url: str | None = None


class GatewaySection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536)
    api_keys: list[str] = Field(
        default_factory=list, description="plain keys or sha256 specs (docs/security.md)"
    )
    max_body_mb: int = Field(16, ge=1, description="a JSON request body (413 beyond)")
    max_upload_mb: int = Field(512, ge=1, description="POST /v1/files")
    allow_priority: bool = False  # let clients set `priority` (it can preempt others' requests)
    route_header: bool = False  # answer with `x-tandem-route` (the router's placement): for debugging
    request_timeout_s: float = Field(600.0, gt=0, description="one generation, start to end (504 beyond)")

    @field_validator("api_keys")
    @classmethod
    def _key_specs(cls, keys: list[str]) -> list[str]:
        from services.gateway.auth import KeySpecError, parse_key

        for i, entry in enumerate(keys):
            try:
                parse_key(entry, i)
            except KeySpecError as e:
                raise ValueError(str(e)) from e
        return keys


class TrainingSection(_Section):
    """The training-job controller (files and fine-tuning API through the gateway)."""

    enabled: bool = True
    cpus: int = Field(1, ge=1, description="trainer workers that may run at once")
    gpus: int = Field(0, ge=0, description="GPUs jobs may hold at once")
    threads_per_worker: int = Field(1, ge=1)
    job_store: str | None = None  # default: SQLite in $TANDEM_HOME/controller; or redis://...
    ray_address: str | None = None  # default: each job starts its own local Ray
    executor: Literal["ray", "kubernetes"] = "ray"  # kubernetes: one KubeRay RayJob per job
    k8s_namespace: str | None = None  # kubernetes: where the RayJobs go (default: the pod's own)
    k8s_image: str = "tandem:latest"  # kubernetes: the RayJob pods' image
    k8s_claim: str | None = None  # kubernetes: the PersistentVolumeClaim holding TANDEM_HOME


class EngineSection(_Section):
    device: str = "cpu"
    dtype: DType = "float32"
    kv_cache_dtype: Literal[("auto", *DTYPE_NAMES)] = "auto"  # the KV cache's: auto = the model's dtype
    kv_cache_mb: int = Field(512, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    # speculative decoding: the default of requests that do not choose (`speculative` extra), drafts
    # per step, and the draft model (a store model with the same tokenizer) of the 'draft' method
    speculative: Literal["off", "ngram", "draft"] = "off"
    num_speculative_tokens: int = Field(4, ge=1, le=16)
    draft_model: str | None = None
    # quantized models on CPUs with AVX-512 VNNI or AVX2: int8 activations and integer dot products
    int8_activations: bool = False

    @model_validator(mode="after")
    def _draft_needs_a_model(self):
        if self.speculative == "draft" and not self.draft_model:
            raise ValueError("speculative 'draft' needs engine.draft_model (a store model)")
        return self


class DeploymentConfig(_Section):
    model: str = "smollm2-135m-instruct"
    model_store: str | None = None  # default: $TANDEM_MODELS
    prefill_workers: int = Field(1, ge=0)
    decode_workers: int = Field(1, ge=0)
    monolithic_workers: int = Field(0, ge=0)
    ep_size: int = Field(
        1, ge=1, description="shards per expert-parallel group (> 1: decode workers are groups)"
    )
    # where the gRPC services (and their metrics) listen: loopback (one machine) or node (the Ray
    # node's IP, so other nodes and Prometheus reach them: a cluster)
    bind: Literal["loopback", "node"] = "loopback"
    engine: EngineSection = Field(default_factory=EngineSection)
    router: RouterSection = Field(default_factory=RouterSection)
    kvstore: KVStoreSection = Field(default_factory=KVStoreSection)
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    resources: dict[str, Resources] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _known_roles(cls, resources: dict[str, Resources]) -> dict[str, Resources]:
        for role in resources:
            if role not in ROLES:
                raise ValueError(f"resources.{role}: unknown role (known: {', '.join(ROLES)})")
        return resources

    def resources_for(self, role: str) -> Resources:
        return self.resources.get(role) or Resources()

    def to_dict(self) -> dict:
        return self.model_dump()


def parse_config(raw: object) -> DeploymentConfig:
    """A DeploymentConfig from parsed YAML (or a `to_dict()`), its problems as one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping, got {type(raw).__name__}")
    try:
        return DeploymentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(field_problems(e)) from e


def validate(cfg: DeploymentConfig, check_model: bool = True, check_redis: bool = True) -> DeploymentConfig:
    """What the models cannot check alone: at least one decoding worker, a reachable Redis, the model
    in the store."""
    if cfg.decode_workers + cfg.monolithic_workers < 1:
        raise ConfigError("decode_workers: at least one decode or monolithic worker is needed")
    if check_redis and cfg.kvstore.redis_url:
        import redis

        from shared import envs

        try:
            password = envs.redis_password()
            extra = {"password": password} if password else {}
            redis.Redis.from_url(cfg.kvstore.redis_url, socket_connect_timeout=2, **extra).ping()
        except (redis.RedisError, ValueError) as e:
            raise ConfigError(f"kvstore.redis_url: cannot reach Redis at {cfg.kvstore.redis_url}: {e}") from e
    if check_model:
        from shared import envs
        from shared.store import ModelStore

        store = ModelStore(Path(cfg.model_store).expanduser() if cfg.model_store else envs.models_dir())
        if not store.has(cfg.model):
            raise ConfigError(
                f"model: '{cfg.model}' is not in the model store at {store.root} "
                f"(import it with `tandem models import {cfg.model}`)"
            )
        draft = cfg.engine.draft_model
        if draft and not store.has(draft):
            raise ConfigError(f"engine.draft_model: '{draft}' is not in the model store at {store.root}")
    return cfg


def load_config(
    path: Path | None = None, check_model: bool = True, check_redis: bool = True
) -> DeploymentConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    return validate(parse_config(raw or {}), check_model, check_redis)
