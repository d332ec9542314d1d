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

`load_config(path)` reads YAML into a DeploymentConfig, filling defaults; every problem (an unknown
key, a wrong type, a negative count, an unreachable Redis, a missing model) is a ConfigError whose
message names the field, e.g. `decode_workers: must be a non-negative integer, got -1`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.router.placement import DEFAULT_POLICY, POLICIES
from shared.core.dtypes import DTYPE_NAMES

ROLES = ("tokenizer", "kvstore", "router", "gateway", "controller", "prefill", "decode")
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "local.yaml"


class ConfigError(ValueError):
    pass


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1  # torch intra-op threads in the actor
    custom: dict[str, float] = field(default_factory=dict)  # Ray custom resources, e.g. {tandem-gateway: 1}


@dataclass
class RouterConfig:
    policy: str = DEFAULT_POLICY
    disagg_threshold: int = 256
    balance_threshold: int = 4
    health_interval: float = 1.0
    max_inflight: int = 1024  # requests the router forwards at once; beyond: 429 (admission control)


@dataclass
class KVStoreConfig:
    memory_mb: int = 1024
    redis_url: str | None = None


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # plain keys or sha256 specs (docs/security.md)
    max_body_mb: int = 16  # a JSON request body (413 beyond)
    max_upload_mb: int = 512  # POST /v1/files
    allow_priority: bool = False  # let clients set `priority` (it can preempt others' requests)
    route_header: bool = False  # answer with `x-tandem-route` (the router's placement): for debugging
    request_timeout_s: float = 600.0  # one generation, start to end (504 / an error event beyond)


@dataclass
class TrainingConfig:
    """The training-job controller (files and fine-tuning API through the gateway)."""

    enabled: bool = True
    cpus: int = 1  # trainer workers that may run at once
    gpus: int = 0  # GPUs jobs may hold at once
    threads_per_worker: int = 1
    job_store: str | None = None  # default: SQLite in $TANDEM_HOME/controller; or redis://...
    ray_address: str | None = None  # default: each job starts its own local Ray
    executor: str = "ray"  # ray | kubernetes (one KubeRay RayJob per job)
    k8s_namespace: str | None = None  # kubernetes: where the RayJobs go (default: the pod's own)
    k8s_image: str = "tandem:latest"  # kubernetes: the RayJob pods' image
    k8s_claim: str | None = None  # kubernetes: the PersistentVolumeClaim holding TANDEM_HOME


@dataclass
class EngineOptions:
    device: str = "cpu"
    dtype: str = "float32"
    kv_cache_mb: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048


@dataclass
class DeploymentConfig:
    model: str = "smollm2-135m-instruct"
    model_store: str | None = None  # default: $TANDEM_MODELS
    prefill_workers: int = 1
    decode_workers: int = 1
    monolithic_workers: int = 0
    ep_size: int = 1  # shards per expert-parallel group; > 1: each decode / monolithic worker is a group
    # where the gRPC services (and their metrics) listen: loopback (one machine) or node (the Ray
    # node's IP, so other nodes and Prometheus reach them: a cluster)
    bind: str = "loopback"
    engine: EngineOptions = field(default_factory=EngineOptions)
    router: RouterConfig = field(default_factory=RouterConfig)
    kvstore: KVStoreConfig = field(default_factory=KVStoreConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    resources: dict[str, Resources] = field(default_factory=dict)

    def resources_for(self, role: str) -> Resources:
        return self.resources.get(role) or Resources()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NESTED = {
    "engine": EngineOptions,
    "router": RouterConfig,
    "kvstore": KVStoreConfig,
    "gateway": GatewayConfig,
    "training": TrainingConfig,
}


def _build(cls, values, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{name}: unknown field (known: {', '.join(fields)})")
        if key in _NESTED and cls is DeploymentConfig:
            kwargs[key] = _build(_NESTED[key], value, name)
        elif key == "resources" and cls is DeploymentConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: must be a mapping of role: resources")
            res = {}
            for role, spec in value.items():
                if role not in ROLES and role != "monolithic":
                    raise ConfigError(f"{name}.{role}: unknown role (known: {', '.join(ROLES)}, monolithic)")
                res[role] = _build(Resources, spec, f"{name}.{role}")
            kwargs[key] = res
        else:
            kwargs[key] = _check_type(fields[key], value, name)
    return cls(**kwargs)


def _check_type(f: dataclasses.Field, value, name: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
    elif kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
    elif kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
    elif kind == "str | None":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string or null, got {value!r}")
    elif kind == "dict[str, float]":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in value.items()
        ):
            raise ConfigError(f"{name}: must be a mapping of resource name: amount, got {value!r}")
        value = {k: float(v) for k, v in value.items()}
    elif kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: must be a list of strings, got {value!r}")
    return value


def validate(cfg: DeploymentConfig, check_model: bool = True, check_redis: bool = True) -> DeploymentConfig:
    for name in ("prefill_workers", "decode_workers", "monolithic_workers"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be a non-negative integer, got {getattr(cfg, name)}")
    if cfg.decode_workers + cfg.monolithic_workers < 1:
        raise ConfigError("decode_workers: at least one decode or monolithic worker is needed")
    if cfg.ep_size < 1:
        raise ConfigError(f"ep_size: must be at least 1, got {cfg.ep_size}")
    if not cfg.gateway.request_timeout_s > 0:
        raise ConfigError(f"gateway.request_timeout_s: must be positive, got {cfg.gateway.request_timeout_s}")
    if cfg.router.max_inflight < 1:
        raise ConfigError(f"router.max_inflight: must be at least 1, got {cfg.router.max_inflight}")
    if cfg.bind not in ("loopback", "node"):
        raise ConfigError(f"bind: must be loopback or node, got '{cfg.bind}'")
    if cfg.router.policy not in POLICIES:
        raise ConfigError(f"router.policy: must be one of {', '.join(POLICIES)}, got '{cfg.router.policy}'")
    for name in ("disagg_threshold", "balance_threshold"):
        if getattr(cfg.router, name) < 0:
            raise ConfigError(f"router.{name}: must not be negative")
    if cfg.kvstore.memory_mb < 0:
        raise ConfigError(f"kvstore.memory_mb: must not be negative, got {cfg.kvstore.memory_mb}")
    if not 0 <= cfg.gateway.port < 65536:
        raise ConfigError(f"gateway.port: must be a TCP port, got {cfg.gateway.port}")
    if cfg.gateway.max_body_mb < 1 or cfg.gateway.max_upload_mb < 1:
        raise ConfigError("gateway.max_body_mb and gateway.max_upload_mb must be at least 1")
    from services.gateway.auth import KeySpecError, parse_key

    for i, entry in enumerate(cfg.gateway.api_keys):
        try:
            parse_key(entry, i)
        except KeySpecError as e:
            raise ConfigError(f"gateway.api_keys: {e}") from e
    if cfg.training.cpus < 1 or cfg.training.gpus < 0 or cfg.training.threads_per_worker < 1:
        raise ConfigError("training: cpus and threads_per_worker must be at least 1, gpus not negative")
    if cfg.training.executor not in ("ray", "kubernetes"):
        raise ConfigError(f"training.executor: must be ray or kubernetes, got '{cfg.training.executor}'")
    if cfg.engine.kv_cache_mb < 1:
        raise ConfigError(f"engine.kv_cache_mb: must be positive, got {cfg.engine.kv_cache_mb}")
    if cfg.engine.dtype not in DTYPE_NAMES:
        raise ConfigError(f"engine.dtype: must be float32, bfloat16 or float16, got '{cfg.engine.dtype}'")
    for role, res in cfg.resources.items():
        if res.num_cpus < 0 or res.num_gpus < 0 or res.threads < 1:
            raise ConfigError(f"resources.{role}: num_cpus and num_gpus must be >= 0 and threads >= 1")
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
    try:
        cfg = _build(DeploymentConfig, raw or {}, "")
    except TypeError as e:  # pragma: no cover - a dataclass refusing its arguments
        raise ConfigError(str(e)) from e
    return validate(cfg, check_model, check_redis)
