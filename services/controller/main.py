"""The training-job controller's config and build: what `tandem serve controller` and the platform's
actors start (job store, executors, the admission loop, the Controller gRPC service)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.rpc.server import Running, ServiceConfig


@dataclass(frozen=True)
class Config(ServiceConfig):
    home: str | None = None  # files and job dirs (default $TANDEM_HOME/controller)
    store: str | None = None  # the model store (default $TANDEM_MODELS)
    job_store: str | None = None  # sqlite:///PATH (default: <home>/controller.db) or redis://HOST:PORT
    executor: str = "ray"  # where jobs run by default: ray | kubernetes
    ray_address: str | None = None  # a Ray cluster for the ray executor (default: a local Ray per job)
    cpus: int = 1  # trainer workers that may run at once
    gpus: int = 0  # GPUs jobs may hold at once
    threads_per_worker: int = 1
    kubernetes: dict | None = None  # the Kubernetes executor's options (namespace, image, claim, mount_path)
    poll_interval: float = 0.5


async def build(cfg: Config) -> Running:
    from services.controller.controller import Capacity
    from services.controller.server import build_controller, start_server
    from shared import envs
    from shared.store import ModelStore

    if cfg.executor == "kubernetes" and cfg.kubernetes is None:
        raise ValueError("the kubernetes executor needs its options (--k8s-namespace)")
    controller = build_controller(
        cfg.home or envs.tandem_home() / "controller", ModelStore.at(cfg.store).root, cfg.job_store,
        cfg.executor, cfg.ray_address, Capacity(cfg.cpus, cfg.gpus), cfg.threads_per_worker, cfg.kubernetes,
    )  # fmt: skip
    server = await start_server(controller, cfg.host, cfg.port, cfg.poll_interval, cfg.metrics_port)

    async def closed():
        controller.store.close()

    return Running.grpc(server, controller, closed)
