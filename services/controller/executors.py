"""Where a job's trainer runs: on Ray (a detached `tandem train run` driver) or as a KubeRay RayJob.

Both run the same trainer (shared/train) with the job's spec file, and both leave the run's
metrics, checkpoints and outcome in the job dir (on Kubernetes a volume the controller shares with
the Ray pods), which the controller reads for events. An executor's handle names the run so a
restarted controller can find it again:

    launch(job) -> handle     start the run
    poll(job)   -> RunStatus  running | succeeded | failed (with the reason)
    cancel(job)               stop it and free what it holds (idempotent)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.controller.records import Job

log = logging.getLogger("tandem.controller")

SPEC_FILE = "spec.yaml"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"


@dataclass(frozen=True)
class RunStatus:
    state: str  # running | succeeded | failed
    reason: str = ""


def read_result(job: Job) -> dict | None:
    path = Path(job.job_dir) / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def log_tail(job: Job, lines: int = 5) -> str:
    """The last lines of the run's log (the reason a trainer died is usually there)."""
    try:
        text = (Path(job.job_dir) / LOG_FILE).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def trainer_command(job: Job, address: str | None) -> list[str]:
    job_dir = Path(job.job_dir)
    cmd = [
        "tandem",
        "train",
        "run",
        "--config",
        str(job_dir / SPEC_FILE),
        "--result",
        str(job_dir / RESULT_FILE),
    ]
    return [*cmd, "--address", address] if address else cmd


class RayExecutor:
    """The trainer as its own process, in its own session so that it outlives a controller restart:
    a Ray driver that starts a local Ray (or joins `address`) and runs Ray Train there. The handle is
    the pid; the process's command line names the job dir, so a recycled pid is never mistaken."""

    name = "ray"

    def __init__(self, address: str | None = None, cancel_grace: float = 10.0):
        self.address = address
        self.cancel_grace = cancel_grace
        self.procs: dict[str, subprocess.Popen] = {}

    def launch(self, job: Job) -> str:
        cmd = [sys.executable, "-m", "services.platform.cli.main", *trainer_command(job, self.address)[1:]]
        env = dict(os.environ)
        if not self.address:  # its own local Ray, even when launched from inside a Ray actor
            env.pop("RAY_ADDRESS", None)
        with open(Path(job.job_dir) / LOG_FILE, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        self.procs[job.id] = proc
        return str(proc.pid)

    def _alive(self, job: Job) -> bool:
        proc = self.procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        return _pid_runs(int(job.handle or 0), job.job_dir)  # a run from before a restart

    def poll(self, job: Job) -> RunStatus:
        if self._alive(job):
            return RunStatus("running")
        self.procs.pop(job.id, None)
        result = read_result(job)
        if result is None:
            tail = log_tail(job)
            return RunStatus("failed", "the trainer exited without a result" + (f": {tail}" if tail else ""))
        if result.get("status") == "succeeded":
            return RunStatus("succeeded")
        return RunStatus("failed", result.get("error") or f"the trainer stopped at step {result.get('step')}")

    def cancel(self, job: Job) -> None:
        pid = int(job.handle or 0)
        if not pid or not self._alive(job):
            return
        try:
            os.killpg(pid, signal.SIGTERM)  # the driver and the local Ray it started
            deadline = time.monotonic() + self.cancel_grace
            while self._alive(job) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(job):
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc = self.procs.pop(job.id, None)
        if proc is not None:
            proc.wait(timeout=5)


def _pid_runs(pid: int, job_dir: str) -> bool:
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and job_dir in cmdline


class KubernetesExecutor:
    """One KubeRay `RayJob` (ray.io/v1) per job: a Ray cluster made for the job (a head, and a worker
    group of `num_workers` pods with their GPUs), the trainer as its entrypoint, torn down when the job
    ends (`shutdownAfterJobFinishes`, then deleted after `ttl_seconds`). Status is followed through the
    Kubernetes API; cancel deletes the RayJob, which takes its cluster with it. The job dir must be on
    the volume `claim` that the controller also mounts, at the same path."""

    name = "kubernetes"
    GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"

    def __init__(
        self,
        namespace: str = "default",
        image: str = "tandem:latest",
        claim: str | None = None,
        mount_path: str = "/var/lib/tandem",
        ttl_seconds: int = 3600,
        ray_version: str = "2.60.0",
        api_client=None,
        cpu_per_worker: str = "2",
        memory_per_worker: str = "8Gi",
    ):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.namespace, self.image, self.claim, self.mount_path = namespace, image, claim, mount_path
        self.ttl_seconds, self.ray_version = ttl_seconds, ray_version
        self.cpu_per_worker, self.memory_per_worker = cpu_per_worker, memory_per_worker

    @staticmethod
    def object_name(job: Job) -> str:
        return "tandem-" + job.id.lower().replace("_", "-")[:50]

    def _pod(self, container: str, resources: dict) -> dict:
        spec: dict = {
            "containers": [
                {
                    "name": container,
                    "image": self.image,
                    "resources": resources,
                    "env": [{"name": "TANDEM_HOME", "value": self.mount_path}],
                }
            ]
        }
        if self.claim:
            spec["containers"][0]["volumeMounts"] = [{"name": "tandem-data", "mountPath": self.mount_path}]
            spec["volumes"] = [{"name": "tandem-data", "persistentVolumeClaim": {"claimName": self.claim}}]
        return {"spec": spec}

    def rayjob(self, job: Job) -> dict:
        gpus = job.spec.gpus_per_worker
        worker = {"cpu": self.cpu_per_worker, "memory": self.memory_per_worker}
        limits = {**worker, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        head = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
        return {
            "apiVersion": f"{self.GROUP}/{self.VERSION}",
            "kind": "RayJob",
            "metadata": {
                "name": self.object_name(job),
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "tandem-controller", "tandem.ai/job-id": job.id},
            },
            "spec": {
                "entrypoint": " ".join(trainer_command(job, "auto")),
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": self.ttl_seconds,
                "rayClusterSpec": {
                    "rayVersion": self.ray_version,
                    "headGroupSpec": {"rayStartParams": {}, "template": self._pod("ray-head", head)},
                    "workerGroupSpecs": [
                        {
                            "groupName": "trainers",
                            "replicas": job.spec.num_workers,
                            "minReplicas": job.spec.num_workers,
                            "maxReplicas": job.spec.num_workers,
                            "rayStartParams": {},
                            "template": self._pod("ray-worker", {"requests": worker, "limits": limits}),
                        }
                    ],
                },
            },
        }

    def launch(self, job: Job) -> str:
        body = self.rayjob(job)
        self.api.create_namespaced_custom_object(self.GROUP, self.VERSION, self.namespace, self.PLURAL, body)
        return body["metadata"]["name"]

    def poll(self, job: Job) -> RunStatus:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.api.get_namespaced_custom_object(
                self.GROUP, self.VERSION, self.namespace, self.PLURAL, job.handle
            )
        except ApiException as e:
            if e.status == 404:
                return RunStatus(
                    "failed", f"RayJob {job.handle} no longer exists in namespace {self.namespace}"
                )
            raise
        status = obj.get("status") or {}
        job_status = status.get("jobStatus", "")
        deployment = status.get("jobDeploymentStatus", "")
        if job_status == "SUCCEEDED":
            return RunStatus("succeeded")
        if job_status in ("FAILED", "STOPPED") or deployment == "Failed":
            result = read_result(job) or {}
            reason = (
                result.get("error")
                or status.get("message")
                or f"RayJob {job.handle}: {job_status or deployment}"
            )
            return RunStatus("failed", reason)
        return RunStatus("running")

    def cancel(self, job: Job) -> None:
        from kubernetes.client.exceptions import ApiException

        if not job.handle:
            return
        try:
            self.api.delete_namespaced_custom_object(
                self.GROUP,
                self.VERSION,
                self.namespace,
                self.PLURAL,
                job.handle,
                propagation_policy="Foreground",
            )
        except ApiException as e:
            if e.status != 404:
                raise
