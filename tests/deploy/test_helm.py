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
        (isolation,) = [
            p
            for p in policies
            if p["metadata"].get("namespace") == pool["namespace"]
            and p["metadata"]["name"] == "pool-isolation"
        ]
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


def _pool(**workers: Any) -> dict:
    pool = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["rayClusters"][0])
    pool["workers"].update(workers)
    return pool


def test_an_autoscaling_pool_lets_its_head_reach_the_api_server():
    """KubeRay's autoscaler (in the head pod) calls the API server, inside the private ranges the pool's
    policy denies: fixed size by default; autoscaling needs the API server's addresses, which it may reach."""
    (fixed,) = by_kind(render(None), "RayCluster").values()
    assert fixed["spec"]["enableInTreeAutoscaling"] is False
    assert "autoscaler-apiserver" not in by_kind(render(None), "NetworkPolicy")

    with pytest.raises(Exception, match=r"rayClusters gpu-a autoscales .* set networkPolicy\.apiServerCIDRs"):
        render(None, rayClusters=[_pool(minReplicas=0, maxReplicas=4)])

    network = {"enabled": True, "runtimeDeniedCIDRs": ["10.0.0.0/8"], "apiServerCIDRs": ["10.96.0.1/32"]}
    docs = render(None, rayClusters=[_pool(minReplicas=0, maxReplicas=4)], networkPolicy=network)
    (cluster,) = by_kind(docs, "RayCluster").values()
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    (api,) = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "autoscaler-apiserver"
    ]
    assert api["metadata"]["namespace"] == "opentinker-pool-gpu-a"
    assert api["spec"] == {
        "podSelector": {"matchLabels": {"ray.io/node-type": "head"}},
        "policyTypes": ["Egress"],
        "egress": [
            {
                "to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}],
                "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
            }
        ],
    }
    for doc in docs:
        validate(doc)
    # Without NetworkPolicies nothing blocks the autoscaler: no addresses needed.
    off = render(None, rayClusters=[_pool(minReplicas=0, maxReplicas=4)], networkPolicy={"enabled": False})
    assert not [
        d for d in off if d["kind"] == "NetworkPolicy" and "pool" in d["metadata"].get("namespace", "")
    ]


def test_the_sandbox_may_make_user_namespaces_in_the_worker_and_the_ray_pods():
    docs = render(None)
    unconfined = {"seccompProfile": {"type": "Unconfined"}, "appArmorProfile": {"type": "Unconfined"}}
    deployments = by_kind(docs, "Deployment")
    (worker,) = containers(deployments["ot-opentinker-worker"])
    assert worker["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        **unconfined,
    }  # fmt: skip
    for role in ("web", "beat"):  # the rest keep the pod's RuntimeDefault
        (c,) = containers(deployments[f"ot-opentinker-{role}"])
        assert "seccompProfile" not in c["securityContext"] and "appArmorProfile" not in c["securityContext"]
    (cluster,) = by_kind(docs, "RayCluster").values()
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ray_worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for c in (head, ray_worker):
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            **unconfined,
        }
    # A stricter profile from the values replaces it (null removes a default, as everywhere in Helm).
    strict_profile = {"seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/userns.json"}}
    docs = render(None, sandbox={"securityContext": {**strict_profile, "appArmorProfile": None}})
    (worker,) = containers(by_kind(docs, "Deployment")["ot-opentinker-worker"])
    assert worker["securityContext"]["seccompProfile"] == strict_profile["seccompProfile"]
    assert "appArmorProfile" not in worker["securityContext"]


def test_install_migrations_and_the_runbook_agree_on_no_wait():
    """The bundled PostgreSQL is installed by the same release, so the migrations are a post-install hook and
    the pods wait for them: `helm install --wait` would wait for those pods before starting the hook."""
    jobs = by_kind(render(None), "Job")
    hooks = jobs["ot-opentinker-migrate"]["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert hooks == ["post-install", "pre-upgrade"]
    runbook = (BASE / "deploy" / "RUNBOOK.md").read_text()
    install = runbook[runbook.index("helm install ot") :]
    install = install[: install.index("\n", install.index("--set host="))]
    assert "--wait" not in install and "--atomic" not in install
    assert "no --wait on install" in runbook and "Hence no\n`--wait` on `helm install`" in runbook


@pytest.mark.parametrize(
    ("web", "workers"),
    [
        ({}, "1"),
        ({"resources": {"requests": {"cpu": "2"}}}, "2"),
        ({"resources": {"requests": {"cpu": "1500m"}}}, "2"),
        ({"resources": {"requests": {"cpu": "250m"}}}, "1"),
        ({"workers": 3}, "3"),
    ],
)
def test_web_runs_one_worker_per_requested_cpu_unless_told(web, workers):
    """deploy/web.py's rule (one uvicorn process per core) sized by the pod's CPU request: in a container
    os.cpu_count() is the node's, so the chart sets WEB_CONCURRENCY; web.workers overrides it."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["web"]
    values["resources"] = {**values["resources"], **web.pop("resources", {})}
    (container,) = containers(by_kind(render(None, web={**values, **web}), "Deployment")["ot-opentinker-web"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WEB_CONCURRENCY"] == workers
