"""deploy/helm/opentinker: rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK: no helm binary)
for the default values and for values-external.yaml; every manifest valid against the Kubernetes schemas
(kubernetes-validate, strict: an unknown field is an error) of the oldest and newest supported versions, the
RayClusters against KubeRay's CRD schema (vendored in deploy/schemas/); the platform's commands exactly
deploy/processes.py's; migrations a hook that runs before an upgrade; the pools' runtime pods kept away from
the database and from each other's namespaces."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy.processes import PROCESSES

BASE = Path(__file__).resolve().parents[2]
CHART = BASE / "deploy" / "helm" / "opentinker"
KUBERNETES = ("1.30.0", "1.37.0")  # Chart.yaml's kubeVersion, and the newest kubernetes-validate knows
NAMESPACE = "opentinker"
PRIVATE = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}


def render(values_file: str | None, **overrides: Any) -> list[dict]:
    values = yaml.safe_load((CHART / values_file).read_text()) if values_file else {}
    values.update(overrides)
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="ot", namespace=NAMESPACE)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def strict(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused, as the API server prunes them (a typo would vanish)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def raycluster_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((BASE / "deploy" / "schemas" / "raycluster-v1.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


def validate(doc: dict) -> None:
    if doc["apiVersion"] == "ray.io/v1":
        errors = [f"{e.json_path}: {e.message}" for e in raycluster_validator().iter_errors(doc)]
        assert not errors, errors
        return
    for version in KUBERNETES:
        kubernetes_validate.validate(doc, version, strict=True)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_chart_lints():
    assert helm.lint(str(CHART))["errors"] == []


@pytest.mark.parametrize("values_file", [None, "values-external.yaml"])
def test_every_manifest_validates(values_file):
    docs = render(values_file)
    kinds = {d["kind"] for d in docs}
    assert {
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Job", "Namespace", "NetworkPolicy",
        "PodDisruptionBudget", "RayCluster", "Service",
    } <= kinds  # fmt: skip
    for doc in docs:
        validate(doc)


def test_the_validation_can_fail():
    (web,) = [
        d for d in render(None) if d["kind"] == "Deployment" and d["metadata"]["name"] == "ot-opentinker-web"
    ]
    broken = copy.deepcopy(web)
    containers(broken)[0]["comand"] = containers(broken)[0].pop("command")
    with pytest.raises(kubernetes_validate.ValidationError, match="comand"):
        validate(broken)
    (ray,) = [d for d in render(None) if d["kind"] == "RayCluster"]
    ray["spec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(AssertionError, match="rayStartParam"):
        validate(ray)


@pytest.mark.parametrize("values_file", [None, "values-external.yaml"])
def test_platform_commands_hooks_and_scaling(values_file):
    docs = render(values_file)
    deployments, jobs = by_kind(docs, "Deployment"), by_kind(docs, "Job")
    for role in ("web", "worker", "beat"):
        (container,) = containers(deployments[f"ot-opentinker-{role}"])
        assert container["command"] == PROCESSES[role], role
        spec = deployments[f"ot-opentinker-{role}"]["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        (wait,) = spec["initContainers"]  # no pod of a new version before its migrations
        assert "migrate --check" in wait["command"][-1]
    assert containers(jobs["ot-opentinker-migrate"])[0]["command"] == PROCESSES["migrate"]
    hooks = jobs["ot-opentinker-migrate"]["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert "pre-upgrade" in hooks  # migrations first on every upgrade
    assert deployments["ot-opentinker-beat"]["spec"]["strategy"] == {"type": "Recreate"}  # never two beats
    assert deployments["ot-opentinker-web"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["ot-opentinker-web"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ot-opentinker-web" and hpa["spec"]["minReplicas"] >= 2
    assert set(by_kind(docs, "PodDisruptionBudget")) == {"ot-opentinker-web", "ot-opentinker-worker"}
    ingress = by_kind(docs, "Ingress")["ot-opentinker"]
    assert ingress["spec"]["tls"][0]["hosts"] == ["opentinker.example.com"]


def test_external_values_run_no_data_service_and_read_urls_from_the_secret():
    docs = render("values-external.yaml")
    assert not by_kind(docs, "StatefulSet")
    config = by_kind(docs, "ConfigMap")["ot-opentinker-config"]["data"]
    assert config["OBJECT_STORE_URL"] == "s3://acme-opentinker-artifacts/prod"
    # The pools' runtimes report to INGEST_BASE_URL: its host must be one the server answers to.
    assert urlsplit(config["INGEST_BASE_URL"]).hostname in config["ALLOWED_HOSTS"].split(",")
    assert "REDIS_URL" not in config and "S3_ENDPOINT_URL" not in config
    (web,) = containers(by_kind(docs, "Deployment")["ot-opentinker-web"])
    assert {"secretRef": {"name": "opentinker-secrets"}} in web["envFrom"]
    assert "DATABASE_URL" not in {e["name"] for e in web["env"]}  # from the Secret
    default = containers(by_kind(render(None), "Deployment")["ot-opentinker-web"])[0]
    (url,) = [e["value"] for e in default["env"] if e["name"] == "DATABASE_URL"]
    assert url == "postgres://opentinker:$(POSTGRES_PASSWORD)@ot-opentinker-postgresql:5432/opentinker"


@pytest.mark.parametrize("values_file", [None, "values-external.yaml"])
def test_gpu_pools_are_rayclusters_registered_as_ray_pools_and_isolated(values_file):
    docs = render(values_file)
    values = yaml.safe_load((CHART / (values_file or "values.yaml")).read_text())
    pools = {p["name"]: p for p in values["rayClusters"]}
    clusters = by_kind(docs, "RayCluster")
    assert set(clusters) == set(pools)
    register = containers(by_kind(docs, "Job")["ot-opentinker-pools"])
    assert [c["command"][:5] for c in register] == [
        ["python", "manage.py", "pool_register", name, "--ray-address"] for name in pools
    ]
    for container, (name, pool) in zip(register, pools.items(), strict=True):
        assert container["command"][5] == f"http://{name}-head-svc.{pool['namespace']}.svc:8265"
        assert json.loads(container["command"][7]) == pool["labels"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for name, pool in pools.items():
        cluster = clusters[name]
        assert cluster["metadata"]["namespace"] == pool["namespace"]
        worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == pool["workers"]["gpusPerPod"]
        (isolation,) = [p for p in policies if p["metadata"].get("namespace") == pool["namespace"]]
        spec = isolation["spec"]
        assert spec["podSelector"] == {} and spec["policyTypes"] == ["Ingress", "Egress"]
        # Into another namespace only to the platform's web (ingest) and MinIO, never the database or Valkey.
        crossing = [
            (peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"], rule["ports"][0]["port"])
            for rule in spec["egress"]
            for peer in rule["to"]
            if peer.get("namespaceSelector")
        ]
        assert crossing == [("web", 8000), ("minio", 9000)] if values_file is None else [("web", 8000)]
        (internet,) = [peer["ipBlock"] for rule in spec["egress"] for peer in rule["to"] if "ipBlock" in peer]
        assert internet["cidr"] == "0.0.0.0/0" and set(internet["except"]) >= PRIVATE
        assert all(peer.get("podSelector") == {} for peer in spec["ingress"][0]["from"])  # own pods
        template_labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
        assert "opentinker.io/database-client" not in template_labels
    if values_file is None:
        database = by_kind(docs, "NetworkPolicy")["ot-opentinker-postgresql"]["spec"]["ingress"]
        assert database == [
            {
                "from": [{"podSelector": {"matchLabels": {"opentinker.io/database-client": "true"}}}],
                "ports": [{"port": 5432, "protocol": "TCP"}],
            }
        ]
