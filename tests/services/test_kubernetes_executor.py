"""The controller's Kubernetes executor against an in-memory Kubernetes API (kmock's emulator, served
over HTTP on loopback, driven by the official `kubernetes` client): the RayJob it creates validates
against KubeRay's CRD (../shared/k8s/crds/ray.io_rayjobs.yaml), its status is followed to success and
to failure, and cancelling deletes it. No real cluster exists here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from services.controller.controller import Capacity, Controller
from services.controller.executors import KubernetesExecutor
from services.controller.job_store import SqliteJobStore
from services.controller.records import Job, JobSpec
from shared.store import DEFAULT_MODEL
from tests.k8s_schemas import crd_schema, prune_nulls
from tests.services.conftest import Loop
from tests.train.train_helpers import fact_rows

NAMESPACE = "training"


@pytest.fixture(scope="module")
def k8s():
    """(kubernetes ApiClient, emulator, loop) with the emulator listening on a free loopback port."""
    import kmock
    from kubernetes import client

    loop = Loop()
    emulator = kmock.KubernetesEmulator()
    server = kmock.Server(emulator)

    async def start():
        await emulator.__aenter__()
        await server.__aenter__()
        return str(server.url).rstrip("/")

    url = loop.run(start())
    config = client.Configuration(host=url)
    api_client = client.ApiClient(config)
    yield api_client, emulator, loop

    async def stop():
        await server.__aexit__(None, None, None)
        await emulator.__aexit__(None, None, None)

    api_client.close()
    loop.run(stop())
    loop.close()


def set_status(api_client, name: str, status: dict) -> None:
    """What KubeRay's operator would do: write the RayJob's status."""
    from kubernetes import client

    client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
        "ray.io", "v1", NAMESPACE, "rayjobs", name, {"status": status}
    )


def job(tmp_path: Path, job_id: str, gpus: int = 1) -> Job:
    spec = JobSpec(model=DEFAULT_MODEL, training_file="file-x", num_workers=2, gpus_per_worker=gpus)
    return Job(job_id, spec, "queued", 0, job_dir=str(tmp_path / job_id), executor="kubernetes")


def test_the_rayjob_validates_against_kuberays_crd_and_is_followed_to_success_and_failure(k8s, tmp_path):
    from kubernetes import client

    api_client, _, _ = k8s
    executor = KubernetesExecutor(NAMESPACE, "tandem:gpu", claim="tandem-data", api_client=api_client)
    ok, bad = job(tmp_path, "ftjob-ok"), job(tmp_path, "ftjob-bad")
    ok.handle, bad.handle = executor.launch(ok), executor.launch(bad)
    api = client.CustomObjectsApi(api_client)
    obj = api.get_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayjobs", ok.handle)
    jsonschema.validate(prune_nulls(obj), crd_schema("ray.io_rayjobs.yaml"))
    spec = obj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert (
        spec["entrypoint"].startswith("tandem train run --config ") and "--address auto" in spec["entrypoint"]
    )
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and worker["image"] == "tandem:gpu"
    assert group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "tandem-data"
    assert obj["metadata"]["labels"]["tandem.ai/job-id"] == "ftjob-ok"

    assert executor.poll(ok).state == "running"  # no status yet: the operator has not started it
    set_status(api_client, ok.handle, {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"})
    assert executor.poll(ok).state == "running"
    set_status(api_client, ok.handle, {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"})
    assert executor.poll(ok).state == "succeeded"

    set_status(api_client, bad.handle, {"jobStatus": "FAILED", "message": "entrypoint exited with 1"})
    assert executor.poll(bad).state == "failed"
    Path(bad.job_dir).mkdir(parents=True)
    (Path(bad.job_dir) / "result.json").write_text(json.dumps({"status": "failed", "error": "out of memory"}))
    assert executor.poll(bad).reason == "out of memory"  # the trainer's own reason, when it left one


def test_the_controller_runs_a_job_as_a_rayjob_and_cancel_deletes_it(k8s, tmp_path, store, default_model_dir):
    from kubernetes import client

    api_client, _, _ = k8s
    api = client.CustomObjectsApi(api_client)
    executor = KubernetesExecutor(NAMESPACE, api_client=api_client)
    controller = Controller(SqliteJobStore(tmp_path / "c.db"), store, tmp_path, {"kubernetes": executor},
                            "kubernetes", Capacity(cpus=4, gpus=2))  # fmt: skip

    async def flow():
        data = "".join(json.dumps(r) + "\n" for r in fact_rows()).encode()
        f = controller.upload_file("fact.jsonl", "fine-tune", data)
        spec = JobSpec(model=DEFAULT_MODEL, training_file=f.id, num_workers=2, gpus_per_worker=1, max_steps=3)
        first = await controller.create_job(spec)
        second = await controller.create_job(spec)  # 2 more GPUs than are free: it waits
        await controller.step()
        first, second = controller.get_job(first.id), controller.get_job(second.id)
        assert first.status == "running" and second.status == "queued"
        assert api.get_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayjobs", first.handle)
        set_status(api_client, first.handle, {"jobStatus": "FAILED", "message": "the head pod was evicted"})
        await controller.step()  # the failure frees its GPUs: the second job starts
        first, second = controller.get_job(first.id), controller.get_job(second.id)
        assert first.status == "failed" and "evicted" in first.error
        assert second.status == "running"
        await controller.cancel_job(second.id)
        assert controller.get_job(second.id).status == "cancelled"
        return first, second

    first, second = asyncio.run(flow())
    items = api.list_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayjobs")["items"]
    names = [o["metadata"]["name"] for o in items]
    assert second.handle not in names and first.handle in names
