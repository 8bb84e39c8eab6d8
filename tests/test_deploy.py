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


def test_the_dynamo_graph_is_a_valid_custom_resource(resources):
    """Dynamo's operator (v1beta1, Dynamo 1.6.1): components with a name, a type, replicas and a pod template,
    each pod template valid for Kubernetes itself (strictly); a frontend routing on KV, workers of this image."""
    (graph,) = yaml.safe_load_all((ROOT / "deploy" / "dynamo" / "graph.yaml").read_text())
    assert graph["kind"] == "DynamoGraphDeployment" and graph["apiVersion"] == "nvidia.com/v1beta1"
    assert set(graph) == {"apiVersion", "kind", "metadata", "spec"} and set(graph["spec"]) == {"components"}
    components = {c["name"]: c for c in graph["spec"]["components"]}
    for component in components.values():
        assert set(component) == {"name", "type", "replicas", "podTemplate"}, component["name"]
        assert component["type"] in ("frontend", "worker") and isinstance(component["replicas"], int)
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": component["name"].lower()},
                    "template": component["podTemplate"]}
        kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
        (container,) = component["podTemplate"]["spec"]["containers"]
        assert container["name"] == "main"  # the operator's main container
    frontend, worker = components["Frontend"]["podTemplate"]["spec"], components["worker"]["podTemplate"]["spec"]
    args = frontend["containers"][0]["args"]
    assert args[:2] == ["-m", "dynamo.frontend"] and args[args.index("--router-mode") + 1] == "kv"
    main = worker["containers"][0]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["NEMODIFF_COMMAND"] == "worker" and main["args"][:2] == ["--discovery-backend", "kubernetes"]
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert all(name in entrypoint for name in env) and "exec nemodiff worker" in entrypoint
    assert {p["containerPort"] for p in main["ports"]} == {8002} and "--metrics-port 8002" in entrypoint
    claims = {v["persistentVolumeClaim"]["claimName"] for v in worker["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {resources["PersistentVolumeClaim"]["metadata"]["name"]}
    assert "deploy/dynamo/graph.yaml" in (ROOT / "docs" / "deploy.md").read_text()


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
    from nemodiff.serving.metric_names import GAUGES

    metrics = (ROOT / "nemodiff" / "serving" / "triton" / "metrics.py").read_text()
    assert "requests_waiting" in GAUGES and 'f"nemodiff_{key}"' in metrics  # the series the server exports


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
