"""deploy/compose.yaml: valid against the Compose Specification's JSON schema (vendored in deploy/schemas/, no
network), every service of a single-host install present with pinned images, the platform's commands exactly
deploy/processes.py's, every variable it interpolates given by deploy/.env.example, and the resulting
settings accepted by `manage.py check --deploy` in production mode."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from deploy.processes import PROCESSES, RAY_PROCESSES
from tests.portal.test_settings_declared import declared_names

BASE = Path(__file__).resolve().parents[2]
DEPLOY = BASE / "deploy"
PLATFORM_ROLES = ("migrate", "web", "worker", "beat")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $.
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # merge keys (<<) resolved by PyYAML


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def interpolate(value: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name, op, arg = m[1], m[2], m[3]
        if op and "?" in op and not env.get(name):
            raise AssertionError(f"{name} is required: {arg}")
        return env.get(name) or (arg if op and "-" in op else "")

    return _VAR.sub(one, value).replace("$$", "$")


def test_compose_file_validates_against_the_compose_spec():
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)
    # The schema can fail: a misspelt key is refused.
    broken = compose()
    broken["services"]["web"]["comand"] = ["python"]
    assert any("comand" in e.message for e in jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_services_images_commands_and_volumes():
    doc = compose()
    services = doc["services"]
    assert set(services) == {
        "postgres", "valkey", "minio", "bucket", "migrate", "web", "worker", "beat", "ray-head", "ray-worker",
    }  # fmt: skip
    for role in PLATFORM_ROLES:
        assert services[role]["command"] == PROCESSES[role], role
        assert services[role]["image"].startswith("opentinker/platform:")
        assert services[role]["environment"]["OPENTINKER_MODE"] == "production"
    for name in ("ray-head", "ray-worker"):
        assert services[name]["image"].startswith("opentinker/gpu:")
        assert services[name]["command"] == RAY_PROCESSES[name]
    for name, service in services.items():  # third-party images pinned to a release, never a moving tag
        image = service["image"]
        assert re.search(r":[^:]*\d[^:]*$", image) and not image.endswith(":latest"), (name, image)
    # migrations first; web, worker and beat wait for them and for the data services.
    for role in ("web", "worker", "beat"):
        deps = services[role]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}
        assert deps["postgres"] == deps["valkey"] == {"condition": "service_healthy"}
    assert services["migrate"]["restart"] == "no"
    assert {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])} == set(doc["volumes"])
    gpu = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_every_variable_comes_from_the_env_file_and_every_setting_is_declared():
    text = (DEPLOY / "compose.yaml").read_text()
    example = env_example()
    used = {m[1] for m in _VAR.finditer(text)}
    optional = {m[1] for m in _VAR.finditer(text) if m[2] and "-" in m[2]}
    assert used - optional <= set(example), f"not in deploy/.env.example: {used - optional - set(example)}"
    declared = set(declared_names())
    outside = {  # read by the containers' own programs, not the platform's settings
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
        "POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
        "MC_HOST_store", "DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_EMAIL", "DJANGO_SUPERUSER_PASSWORD",
        "OPENTINKER_VERSION", "RUNTIME_S3_ACCESS_KEY", "RUNTIME_S3_SECRET_KEY",
    }  # fmt: skip
    given = set(example) | {k for s in compose()["services"].values() for k in s.get("environment", {})}
    assert given - declared - outside == set(), "unknown settings (typo, or add them to portal/settings.py)"


def test_web_is_published_on_loopback_and_the_runtimes_reach_only_what_they_need():
    doc = compose()
    services = doc["services"]
    assert services["web"]["ports"] == ["127.0.0.1:${WEB_PORT:-8000}:8000"]  # for the TLS proxy only
    assert [n for n, s in services.items() if s.get("ports")] == ["web"]
    assert set(doc["networks"]) == {"platform", "runtime"}
    # Every service names its networks (one left on compose's `default` would reach nothing).
    assert {
        n for n, s in services.items() if not set(s.get("networks", [])) <= {"platform", "runtime"}
    } == set()
    assert {n for n, s in services.items() if "platform" in s["networks"]} == set(services) - {
        "ray-head",
        "ray-worker",
    }
    on_runtime = {n for n, s in services.items() if "runtime" in s["networks"]}
    assert on_runtime == {"ray-head", "ray-worker", "web", "worker", "minio"}  # no postgres, no valkey
    assert services["ray-head"]["networks"] == services["ray-worker"]["networks"] == ["runtime"]
    for name in ("ray-head", "ray-worker"):  # a bucket-scoped MinIO user, never the root credentials
        env = services[name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == "${RUNTIME_S3_ACCESS_KEY:?set it in deploy/.env}"
        assert "MINIO_ROOT" not in json.dumps(env)
    bucket = "\n".join(services["bucket"]["command"])
    assert 'mc admin user add store "$$RUNTIME_S3_ACCESS_KEY"' in bucket
    assert '"Resource": ["arn:aws:s3:::opentinker/*"]' in bucket and "s3:*" not in bucket
    # The sandbox (bwrap) needs user namespaces: the default seccomp and AppArmor profiles refuse them.
    for name in ("worker", "ray-head", "ray-worker"):
        assert services[name]["security_opt"] == ["seccomp=unconfined", "apparmor=unconfined"], name
    for name in ("web", "beat", "migrate", "postgres", "valkey", "minio", "bucket"):
        assert "security_opt" not in services[name], name


@pytest.mark.parametrize("role", ["web", "worker"])
def test_the_compose_settings_pass_the_deploy_check(role):
    """The environment compose gives the platform (env file with its secrets filled in, then the service's
    own variables) passes `manage.py check --deploy`; the one warning is the HTTPS redirect, left to the TLS
    proxy on purpose (compose.yaml says why)."""
    # each change-me as `openssl rand -hex 32` would replace it
    example = {
        k: (secrets.token_hex(32) if v.startswith("change-me") else v) for k, v in env_example().items()
    }
    service = compose()["services"][role]
    env = {**os.environ, **example}
    env.update({k: interpolate(str(v), example) for k, v in service["environment"].items()})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # a directory of the container
    r = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"], cwd=BASE, env=env, capture_output=True, text=True
    )
    # The Ray jobs' runtimes report to INGEST_BASE_URL: its host must be one the server answers to.
    assert urlsplit(env["INGEST_BASE_URL"]).hostname in env["ALLOWED_HOSTS"].split(",")
    assert env["ALLOWED_HOSTS"].split(",")[0] == "opentinker.example.com"  # the image's HEALTHCHECK's Host
    assert r.returncode == 0, r.stderr + r.stdout
    assert re.findall(r"\(security\.\w+\)", r.stderr + r.stdout) == ["(security.W008)"], r.stderr + r.stdout


def test_stop_grace_periods_cover_the_graceful_shutdowns():
    """Docker kills a service 10 s after SIGTERM unless told otherwise: the web server's workers get 30 s to
    finish their requests, a Celery worker finishes its tasks (as the Helm chart's grace periods allow)."""
    from deploy.web import GRACEFUL_SECONDS

    services = compose()["services"]
    helm = DEPLOY / "helm" / "opentinker" / "templates"
    for role in ("web", "worker"):
        grace = re.search(r"terminationGracePeriodSeconds: (\d+)", (helm / f"{role}.yaml").read_text())
        assert services[role]["stop_grace_period"] == f"{grace.group(1)}s", role
    assert int(services["web"]["stop_grace_period"].rstrip("s")) >= GRACEFUL_SECONDS + 5
