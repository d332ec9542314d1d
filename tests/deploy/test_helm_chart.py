"""The Helm chart, proven offline: rendered and linted with Helm's own Go SDK (helm-python-sdk) for the
default values and deploy/values-gpu-production.yaml; every core object validated in strict mode against
the Kubernetes 1.30 schemas (kubernetes-validate), every custom resource against the CRDs in
../shared/k8s/crds (KubeRay, Prometheus operator); the values schema rejects a catalogue of mistakes;
and the deployment config the chart renders loads in `tandem up`'s own config loader."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.platform.deploy.config import load_config
from tests.k8s_schemas import crd_schema, prune_nulls

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tandem"
PRODUCTION = ROOT / "deploy" / "values-gpu-production.yaml"
GRAFANA = ROOT / "deploy" / "grafana"
CRD_FILES = {
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
}
helm = pytest.importorskip("helm_python")


def render(values: dict) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="prod", namespace="llm")
    return [
        d
        for name, text in sorted(out.items())
        if name.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d
    ]


def production() -> dict:
    return yaml.safe_load(PRODUCTION.read_text())


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def test_the_chart_lints_clean():
    report = helm.lint(str(CHART))
    assert report["errors"] == []
    assert all(m["severity"] <= 1 for m in report["messages"]), report["messages"]  # info only (no icon)


@pytest.mark.parametrize("values", ["default", "production"])
def test_every_rendered_object_validates_against_kubernetes_and_crd_schemas(values):
    objects = render({} if values == "default" else production())
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_FILES:
            jsonschema.validate(prune_nulls(obj), crd_schema(CRD_FILES[key]))
        else:
            kubernetes_validate.validate(obj, "1.30", strict=True)
    expected = ["ConfigMap", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget",
                "PodDisruptionBudget", "RayCluster", "Role", "RoleBinding", "Secret", "Secret", "Service",
                "Service", "ServiceAccount", "StatefulSet"]  # fmt: skip
    if (
        values == "production"
    ):  # ingress and monitors on; the API keys, Redis password and internal token are the user's
        # Secrets, plus the scrape config (a Secret) and the NetworkPolicy that lets Prometheus in
        expected.remove("Secret")
        expected = sorted(
            [*expected, "ConfigMap", "Ingress", "PodMonitor", "ServiceMonitor", "NetworkPolicy"]
        )
    assert kinds(objects) == expected


def test_the_raycluster_puts_gpus_probes_and_the_launcher_where_they_belong():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(production())}
    cluster = objects[("RayCluster", "prod-tandem")]["spec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    launcher = next(c for c in head["containers"] if c["name"] == "launcher")
    assert "tandem up --address 127.0.0.1:6379 --config /etc/tandem/deploy.yaml" in launcher["args"][0]
    assert launcher["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert launcher["livenessProbe"]["httpGet"]["path"] == "/health"
    gpu, cpu = cluster["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["replicas"], cpu["groupName"]) == ("gpu", 8, "cpu")
    worker = gpu["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu" and "podAntiAffinity" in worker["affinity"]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    for spec in (head, worker):  # non-root, the store volume, the secrets as environment
        assert spec["securityContext"]["runAsNonRoot"] is True
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["TANDEM_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
            "name": "tandem-api-keys",
            "key": "api-keys",
        }
        assert env["TANDEM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "tandem-redis"
        # the gRPC plane: the shared token and mutual TLS from the user's Secrets
        assert env["TANDEM_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tandem-internal"
        assert env["TANDEM_TLS_CA"]["value"] == "/etc/tandem-tls/ca.crt"
        assert {"name": "internal-tls", "mountPath": "/etc/tandem-tls", "readOnly": True} in spec[
            "containers"
        ][0]["volumeMounts"]
        assert {"name": "internal-tls", "secret": {"secretName": "tandem-internal-tls"}} in spec["volumes"]
    service = objects[("Service", "prod-tandem-gateway")]["spec"]
    assert service["selector"]["tandem.ai/role"] == "head"
    role = objects[("Role", "prod-tandem-rayjobs")]
    assert role["rules"][0] == {"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                "verbs": ["create", "get", "list", "watch", "delete"]}  # fmt: skip
    gateway_policy = objects[("NetworkPolicy", "prod-tandem-gateway")]["spec"]
    assert gateway_policy["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]


@pytest.mark.parametrize("values", ["default", "production"])
def test_the_rendered_deployment_config_loads_in_tandem_ups_loader(values, tmp_path):
    objects = render({} if values == "default" else production())
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and "deploy.yaml" in o["data"]]
    path = tmp_path / "deploy.yaml"
    path.write_text(config_map["data"]["deploy.yaml"])
    cfg = load_config(path, check_model=False, check_redis=False)
    assert cfg.model_store == "/var/lib/tandem/models"
    assert cfg.gateway.host == "0.0.0.0" and cfg.gateway.port == 8000
    assert cfg.kvstore.redis_url == "redis://prod-tandem-redis:6379/0"
    assert cfg.resources_for("gateway").custom == {"tandem-gateway": 1.0}
    assert cfg.resources_for("decode").num_gpus == 1
    assert cfg.engine.kv_cache_dtype == "auto"
    if values == "production":
        assert (cfg.prefill_workers, cfg.decode_workers) == (2, 4)
        t = cfg.training
        assert (t.executor, t.k8s_namespace, t.k8s_claim) == ("kubernetes", "llm", "prod-tandem-store")


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"platform": {"decode_workers": -1}}, "/platform/decode_workers': minimum: got -1, want 0"),
        ({"ray": {"gpuWorkers": {"replicas": -2}}}, "/ray/gpuWorkers/replicas': minimum: got -2, want 0"),
        (
            {"ray": {"gpuWorkers": {"gpusPerPod": "2"}}},
            "/ray/gpuWorkers/gpusPerPod': got string, want integer",
        ),
        ({"platform": {"model": None}}, "missing property 'model'"),
        ({"platform": {"model": ""}}, "/platform/model': minLength: got 0, want 1"),
        ({"platform": {"router": {"policy": "random"}}}, "value must be one of 'round_robin'"),
        ({"platform": {"engine": {"kv_cache_dtype": "fp8"}}}, "value must be one of 'auto'"),
        ({"gateway": {"port": 70000}}, "/gateway/port': maximum: got 70,000, want 65,535"),
        ({"platfrom": {}}, "additional properties 'platfrom' not allowed"),
        ({"redis": {"enabled": False, "externalUrl": "localhost:6379"}}, "/redis/externalUrl"),
    ],
)
def test_the_values_schema_rejects_mistakes_with_clear_messages(values, problem):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.errors.HelmError) as e:
        chart.validate_schema(values)
    assert problem in str(e.value)


def test_the_grafana_dashboards_ship_as_a_labelled_config_map_of_valid_dashboards():
    (maps,) = [o for o in render(production()) if o["metadata"]["name"] == "prod-tandem-dashboards"]
    assert maps["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = {f.name for f in GRAFANA.glob("*.json")}
    assert set(maps["data"]) == shipped and len(shipped) == 5  # the chart links deploy/grafana
    for name in shipped:
        dashboard = json.loads(maps["data"][name])
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        assert exprs and all("tandem:" in e for e in exprs)


def test_prometheus_finds_every_service_through_the_gateway_and_may_reach_them():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(production())}
    (config,) = yaml.safe_load(
        objects[("Secret", "prod-tandem-scrape-config")]["stringData"]["scrape-configs.yaml"]
    )
    (sd,) = config["http_sd_configs"]
    assert sd["url"] == "http://prod-tandem-gateway.llm.svc:8000/dashboard/targets"
    assert "authorization" in sd  # production has API keys: discovery needs one
    metrics = objects[("NetworkPolicy", "prod-tandem-metrics")]["spec"]["ingress"][0]["from"][0]
    assert metrics["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    deploy = yaml.safe_load(objects[("ConfigMap", "prod-tandem-deploy")]["data"]["deploy.yaml"])
    assert deploy["bind"] == "node"  # services listen on the pod IP: other pods and Prometheus reach them


def test_the_grafana_dashboards_are_what_their_builder_writes():
    import runpy

    built = runpy.run_path(str(GRAFANA / "build.py"))["render"]()
    assert built == {f.name: f.read_text() for f in GRAFANA.glob("*.json")}, "run deploy/grafana/build.py"


def test_the_service_monitor_authenticates_with_a_key_of_its_own():
    monitor = next(o for o in render(production()) if o["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"] == {
        "name": "tandem-metrics-key",
        "key": "key",
    }
    values = production()
    del values["monitoring"]["serviceMonitor"]["apiKeySecret"]
    with pytest.raises(helm.errors.HelmError, match="apiKeySecret.name: with API keys set"):
        render(values)


def test_a_worker_that_cannot_fit_its_pod_fails_the_render():
    with pytest.raises(helm.errors.HelmError, match="gpusPerActor \\(2\\) is more than gpusPerPod \\(1\\)"):
        render({"ray": {"gpuWorkers": {"gpusPerPod": 1, "gpusPerActor": 2}}})
