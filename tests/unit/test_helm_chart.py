"""deploy/helm/vlm-serve: rendered by the Helm SDK (helm-python-sdk: Helm's own Go code,
no cluster), linted, every object validated against the Kubernetes schemas
(kubernetes-validate), the PrometheusRule's rules checked by promtool. It has not run on a
live cluster (none can run here)."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, lint

from tests.conftest import ROOT

CHART = ROOT / "deploy" / "helm" / "vlm-serve"
KUBERNETES = "1.33"
CRDS = {"PodMonitor", "PrometheusRule"}  # prometheus-operator's: not in the core schemas


def render(**values) -> dict[tuple[str, str], dict]:
    chart = Chart.load(CHART)
    try:
        files = chart.render(values, name="demo", namespace="vlm")
    finally:
        chart.close()
    objects = {}
    for text in files.values():
        for doc in yaml.safe_load_all(text):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


VARIANTS = {
    "defaults": {},
    "cpu, no autoscaling, no monitoring": {
        "triton": {"gpus": 0},
        "autoscaling": {"enabled": False},
        "monitoring": {"enabled": False},
    },
    "keys, a claim made elsewhere": {"apiKeysSecret": "vlm-keys", "triton": {"hfCache": {"existingClaim": "models"}}},
}


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_object_is_valid_for_kubernetes(values):
    objects = render(**values)
    for (kind, name), doc in objects.items():
        if kind in CRDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", name
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert lint(str(CHART))["errors"] == []


def test_triton_gets_its_gpus_the_shared_cache_and_probes():
    objects = render()
    triton = objects[("Deployment", "demo-vlm-triton")]
    pod = triton["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "replicas" not in triton["spec"], "the HPA owns the replica count"
    claim = {v["name"]: v for v in pod["volumes"]}["hf-cache"]["persistentVolumeClaim"]["claimName"]
    assert objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}  # the watchdog
    drain = int(env_of(triton)["TRITON_DRAIN_S"])  # rolling updates: not ready, still serving, then stop
    assert 0 < drain < pod["terminationGracePeriodSeconds"] - 10
    cpu = render(triton={"gpus": 0}, autoscaling={"enabled": False})[("Deployment", "demo-vlm-triton")]
    assert "nvidia.com/gpu" not in cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cpu["spec"]["replicas"] == 1


def test_grpc_is_balanced_per_request_through_a_headless_service():
    objects = render()
    pods = objects[("Service", "demo-vlm-triton-pods")]
    assert pods["spec"]["clusterIP"] == "None"
    env = env_of(objects[("Deployment", "demo-vlm-fastapi")])
    assert env["TRITON_GRPC_URL"] == "dns:///demo-vlm-triton-pods:8001"  # round-robin over every pod
    assert env["TRITON_HEALTH_URL"] == "http://demo-vlm-triton-pods:8003"  # every pod's watchdog


def test_the_gateway_runs_the_repositorys_nginx_template():
    objects = render(apiKeysSecret="vlm-keys")
    template = objects[("ConfigMap", "demo-vlm-gateway-template")]["data"]["vlm.conf.template"]
    assert template == (ROOT / "nginx" / "templates" / "vlm.conf.template").read_text().rstrip("\n")
    env = env_of(objects[("Deployment", "demo-vlm-gateway")])
    assert env["NGINX_AUTH_REQUEST"] == "/_auth" and env["FASTAPI_SERVERS"] == "server demo-vlm-fastapi:8080;"
    fastapi = objects[("Deployment", "demo-vlm-fastapi")]["spec"]["template"]["spec"]["containers"][0]
    assert fastapi["envFrom"] == [{"secretRef": {"name": "vlm-keys"}}]


def test_the_hpa_scales_triton_on_queueing_against_computing(tmp_path):
    objects = render()
    hpa = objects[("HorizontalPodAutoscaler", "demo-vlm-triton")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo-vlm-triton"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vlm_queue_to_compute_ratio"
    rule = objects[("PrometheusRule", "demo-vlm")]["spec"]
    recorded = [r["record"] for g in rule["groups"] for r in g["rules"] if "record" in r]
    assert recorded == ["vlm_queue_to_compute_ratio"]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule))
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package"
    check = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    monitor = objects[("PodMonitor", "demo-vlm")]["spec"]
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} == {"metrics", "http"}
