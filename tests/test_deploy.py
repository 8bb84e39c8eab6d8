"""The Kubernetes recipe (deploy/): valid manifests whose parts point at each other and at real endpoints.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[deploy/: pods, Service, autoscaler]──▶ clients
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = re.search(r"KUBERNETES_VERSION \?= (\S+)", (ROOT / "Makefile").read_text()).group(1)


@pytest.fixture(scope="module")
def resources() -> dict[str, dict]:
    found = {}
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc | {"_file": path.name}
    return found


def test_every_manifest_passes_the_schema_check(resources):
    assert set(resources) >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for resource in resources.values():
        body = {k: v for k, v in resource.items() if k != "_file"}
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)


def test_probes_hit_tritons_health_endpoints_on_the_http_port(resources):
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # what docker/entrypoint.sh serves on
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {"NEMODIFF_TP", "NEMODIFF_CHECKPOINT", "NEMODIFF_ENGINE"} <= set(env)
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert all(name in entrypoint for name in env)


def test_service_reaches_the_pods(resources):
    deployment, service = resources["Deployment"], resources["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == names
    budget = resources.get("PodDisruptionBudget")
    if budget:
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_autoscaler_scales_the_deployment_on_waiting_requests(resources):
    hpa, adapter = resources["HorizontalPodAutoscaler"], resources["ConfigMap"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": resources["Deployment"]["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "nemodiff_requests_waiting"
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert any(rule["name"]["as"] == "nemodiff_requests_waiting" and "nemodiff_requests_waiting" in rule["seriesQuery"]
               for rule in rules)
    metrics = (ROOT / "nemodiff" / "serving" / "triton" / "metrics.py").read_text()
    assert '"requests_waiting"' in metrics and 'f"nemodiff_{key}"' in metrics  # the series the server exports


def test_the_guide_covers_every_manifest(resources):
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for resource in resources.values():
        assert f"deploy/{resource['_file']}" in guide


def test_the_image_copies_only_what_exists():
    """Every COPY source of the Dockerfile is in the repository (the package is the one folder nemodiff/)."""
    sources = [word for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
               if line.startswith("COPY ") and "--from" not in line for word in line.split()[1:-1]]
    assert "nemodiff" in sources
    assert [s for s in sources if not (ROOT / s).exists()] == []
