"""The environment registry and marketplace API: upload, validation, search, stars, forks, downloads.

Three actors: alice (owner of acme), bob (member of acme; a viewer in some tests) and charlie (owner of
globex), who gets 404 for every private or organization package of acme on every endpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest

from env_registry import services
from env_registry.models import EnvironmentPackage, EnvironmentVersion, Star
from opentinker.spec import example_rl_spec
from portal.models import Job, Membership, Role

pytestmark = pytest.mark.django_db

V1 = "/api/v1"

MANIFEST = {
    "name": "echo",
    "version": "1.2.3",
    "entrypoint": "echo_env:Echo",
    "protocol": "single-turn",
    "description": "Echoes the prompt",
    "tags": ["demo", "single-turn"],
    "license": "MIT",
}
SOURCE = b"""
from opentinker.env import Environment, Observation, StepResult
class Echo(Environment):
    def reset(self, seed):
        return Observation(f"say {seed}")
    def step(self, action):
        return StepResult(None, 1.0 if action == "say 0" else 0.0, True)
"""
README = b"# Echo\n\nSays **things** with `code`.\n\n<script>alert('x')</script>\n\n- one\n- two\n"


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def package(**manifest_changes) -> bytes:
    manifest = {**MANIFEST, **manifest_changes}
    return make_tar(
        {"opentinker.json": json.dumps(manifest).encode(), "echo_env.py": SOURCE, "README.md": README}
    )


def upload(client, data: bytes, **fields):
    return client.post(
        f"{V1}/envs",
        {"archive": io.BytesIO(data), **fields},
        format="multipart",
    )


@pytest.fixture
def store(settings, tmp_path) -> Path:
    root = tmp_path / "objects"
    settings.OBJECT_STORE_URL = f"file://{root}"
    return root


def stored_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def job_with(ref: str) -> dict:
    return {**example_rl_spec().model_dump(mode="json"), "environment": {"ref": ref}}


@pytest.fixture
def published(as_alice, store):
    """acme/echo@1.2.3, uploaded by alice (private), validated in the sandbox."""
    data = package()
    resp = upload(as_alice, data)
    assert resp.status_code == 201, resp.content
    return data


# ----------------------------------------------------------------------------------------------------
# Upload, validation, jobs


def test_upload_validates_stores_and_a_job_can_use_it(as_alice, alice, store, published):
    v = EnvironmentVersion.objects.get(package__organization__slug="acme", package__name="echo")
    assert v.status == "valid" and v.validation_error == ""
    assert v.sha256 == hashlib.sha256(published).hexdigest() and v.size_bytes == len(published)
    assert v.uploaded_by == alice and v.manifest["entrypoint"] == "echo_env:Echo"
    assert stored_files(store) == ["orgs/acme/envs/echo/1.2.3.tar.gz"]
    assert (store / "orgs/acme/envs/echo/1.2.3.tar.gz").read_bytes() == published

    body = as_alice.get(f"{V1}/envs/acme/echo").json()
    assert (body["owner"], body["name"], body["visibility"]) == ("acme", "echo", "private")
    assert body["description"] == "Echoes the prompt" and body["tags"] == ["demo", "single-turn"]
    assert body["latest_version"] == "1.2.3"
    [version] = body["versions"]
    assert version["version"] == "1.2.3" and version["status"] == "valid"
    assert version["sha256"] == v.sha256 and version["uploaded_by"] == "alice"
    assert version["manifest"]["protocol"] == "single-turn"
    assert body["readme"] == README.decode()
    assert body["readme_html"] == (
        "<h1>Echo</h1>\n<p>Says <strong>things</strong> with <code>code</code>.</p>\n"
        "<p>&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;</p>\n<ul><li>one</li><li>two</li></ul>"
    )
    assert (body["stars"], body["starred"], body["usage_count"], body["forked_from"]) == (0, False, 0, None)

    resp = as_alice.post(f"{V1}/jobs", job_with("acme/echo@1.2.3"), format="json")
    assert resp.status_code == 201, resp.content
    resp = as_alice.post(f"{V1}/jobs", job_with("acme/echo@latest"), format="json")
    assert resp.status_code == 201, resp.content

    # The archive downloads byte for byte, with its checksum.
    resp = as_alice.get(f"{V1}/envs/acme/echo/versions/1.2.3/archive")
    assert resp.status_code == 200
    assert b"".join(resp.streaming_content) == published
    assert resp["X-Checksum-Sha256"] == v.sha256


def test_invalid_package_ends_invalid_with_its_reason_and_jobs_are_refused(as_alice, store):
    broken = make_tar(
        {
            "opentinker.json": json.dumps(MANIFEST).encode(),
            "echo_env.py": b"import no_such_module_anywhere\n",
        }
    )
    resp = upload(as_alice, broken)
    assert resp.status_code == 201, resp.content
    [version] = resp.json()["versions"]
    assert version["status"] == "invalid"
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in version["validation_error"]
    assert resp.json()["latest_version"] is None
    for ref in ("acme/echo@1.2.3", "acme/echo@latest"):
        resp = as_alice.post(f"{V1}/jobs", job_with(ref), format="json")
        assert resp.status_code == 400, resp.content
        assert "environment.ref" in resp.json()["error"]["fields"]
    assert Job.objects.count() == 0


def test_a_package_whose_step_raises_is_invalid(as_alice, store):
    source = SOURCE.replace(b"return StepResult(None", b"raise RuntimeError('boom'); return StepResult(None")
    data = make_tar({"opentinker.json": json.dumps(MANIFEST).encode(), "echo_env.py": source})
    version = upload(as_alice, data).json()["versions"][0]
    assert version["status"] == "invalid"
    assert "smoke episode failed: step failed" in version["validation_error"]
    assert "RuntimeError: boom" in version["validation_error"]


def _dotdot() -> bytes:
    return make_tar(
        {
            "opentinker.json": json.dumps(MANIFEST).encode(),
            "echo_env.py": SOURCE,
            "../escape.py": b"x = 1",
        }
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: package(version="1.2"), "version must be semver"),
        (lambda: package(protocol="telepathy"), "protocol"),
        (lambda: package(entrypoint="nowhere:Echo"), "entrypoint module nowhere is not in the archive"),
        (lambda: make_tar({"echo_env.py": SOURCE}), "archive has no opentinker.json"),
        (lambda: make_tar({"opentinker.json": b"{not json", "echo_env.py": SOURCE}), "not valid JSON"),
        (_dotdot, "points outside the package"),
        (lambda: b"definitely not a tarball", "not a readable .tar.gz"),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_written(as_alice, store, data, message):
    resp = upload(as_alice, data())
    assert resp.status_code == 400, resp.content
    err = resp.json()["error"]
    assert err["code"] == "invalid" and message in err["message"] and "archive" in err["fields"]
    assert EnvironmentPackage.objects.filter(organization__slug="acme").count() == 0
    assert EnvironmentVersion.objects.filter(package__organization__slug="acme").count() == 0
    assert stored_files(store) == []


def test_upload_form_errors(as_alice, store):
    resp = as_alice.post(f"{V1}/envs", {}, format="multipart")
    assert resp.status_code == 400 and "archive" in resp.json()["error"]["fields"]
    resp = upload(as_alice, package(), visibility="everyone")
    assert resp.status_code == 400 and "visibility" in resp.json()["error"]["fields"]
    resp = as_alice.post(f"{V1}/envs", {"archive": "x"}, format="json")
    assert resp.status_code == 415
    assert stored_files(store) == [] and not EnvironmentPackage.objects.filter(organization__slug="acme")


def test_oversized_upload_is_413_and_nothing_is_written(as_alice, store, settings):
    settings.ENV_ARCHIVE_MAX_BYTES = 2000
    big = package(description="x" * 400) + b"\0" * 3000  # over the archive limit, under the body limit
    resp = upload(as_alice, big)
    assert resp.status_code == 413, resp.content
    assert resp.json()["error"]["code"] == "payload_too_large"
    # Declared over the body limit: refused before anything reads the body.
    resp = as_alice.generic(
        "POST",
        f"{V1}/envs",
        b"",
        content_type="multipart/form-data; boundary=x",
        CONTENT_LENGTH=str(2000 + 64 * 1024 + 1),
    )
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    assert stored_files(store) == [] and not EnvironmentPackage.objects.filter(organization__slug="acme")


def test_the_default_archive_limit_is_20_mib_not_the_json_limit(as_alice, store, settings):
    assert settings.API_MAX_BODY_BYTES < 1024 * 1024
    # A package bigger than the JSON body limit is fine (incompressible padding in the archive).
    padding = random.Random(0).randbytes(600 * 1024)
    data = make_tar(
        {"opentinker.json": json.dumps(MANIFEST).encode(), "echo_env.py": SOURCE, "data.bin": padding}
    )
    assert len(data) > settings.API_MAX_BODY_BYTES
    resp = upload(as_alice, data)
    assert resp.status_code == 201, resp.content


def test_versions_are_immutable(as_alice, as_bob, store, published):
    # Organization-visible, so bob (a plain member) may publish to it: a private one is alice's and the
    # admins' only (tests/api/test_envs_visibility.py).
    as_alice.patch(f"{V1}/envs/acme/echo", {"visibility": "organization"}, format="json")
    changed = package(description="another build of the same version")
    for client in (as_alice, as_bob):
        resp = upload(client, changed)
        assert resp.status_code == 409, resp.content
        assert resp.json()["error"]["code"] == "conflict" and "immutable" in resp.json()["error"]["message"]
    assert (store / "orgs/acme/envs/echo/1.2.3.tar.gz").read_bytes() == published
    assert EnvironmentVersion.objects.filter(package__name="echo").count() == 1
    # A new version is fine, and becomes the latest.
    resp = upload(as_bob, package(version="1.3.0"))
    assert resp.status_code == 201
    body = resp.json()
    assert body["latest_version"] == "1.3.0" and [v["version"] for v in body["versions"]] == [
        "1.3.0",
        "1.2.3",
    ]
    assert body["versions"][0]["uploaded_by"] == "bob"


def test_validation_in_celery_after_commit(as_alice, store, settings, django_capture_on_commit_callbacks):
    from portal.celery import app
    from workers.env_tasks import validate_version_task

    settings.ENV_VALIDATION_MODE = "celery"
    with (
        mock.patch.object(app, "send_task") as enqueue,
        django_capture_on_commit_callbacks(execute=True),
    ):
        resp = upload(as_alice, package())
    assert resp.status_code == 201 and resp.json()["versions"][0]["status"] == "pending"
    version = EnvironmentVersion.objects.get(package__name="echo")
    # Sent by name after the commit (the registry never imports workers); the worker's task has that name.
    enqueue.assert_called_once()
    assert enqueue.call_args.args == (validate_version_task.name,)
    assert validate_version_task.name == "env_registry.validate_version"
    assert enqueue.call_args.kwargs["args"] == [version.pk]
    # A pending version cannot be used yet.
    resp = as_alice.post(f"{V1}/jobs", job_with("acme/echo@1.2.3"), format="json")
    assert resp.status_code == 400 and "waiting for validation" in resp.json()["error"]["message"]
    # The task (run twice: idempotent) validates it.
    assert validate_version_task.run(version.pk) == "valid"
    assert validate_version_task.run(version.pk) == "valid"
    assert as_alice.post(f"{V1}/jobs", job_with("acme/echo@1.2.3"), format="json").status_code == 201


def test_viewer_cannot_upload_patch_star_or_fork(bob, acme, make_token, store, published):
    from tests.conftest import client_for

    Membership.objects.filter(user=bob, organization=acme).update(role=Role.VIEWER)
    # Organization-visible: a private package would be a 404 to bob whatever his role's scopes.
    EnvironmentPackage.objects.filter(name="echo").update(visibility="organization")
    as_viewer = client_for(make_token(bob, acme))
    assert upload(as_viewer, package(version="2.0.0")).status_code == 403
    assert as_viewer.patch(f"{V1}/envs/acme/echo", {"description": "x"}, format="json").status_code == 403
    assert as_viewer.put(f"{V1}/envs/acme/echo/star").status_code == 403
    assert as_viewer.post(f"{V1}/envs/acme/echo/fork", {"name": "e2"}, format="json").status_code == 403
    assert EnvironmentVersion.objects.count() == EnvironmentVersion.objects.exclude(version="2.0.0").count()
    # Reading is fine.
    assert as_viewer.get(f"{V1}/envs/acme/echo").status_code == 200


# ----------------------------------------------------------------------------------------------------
# Tenancy


@pytest.mark.parametrize("visibility", ["private", "organization"])
def test_outsider_gets_404_on_every_endpoint(as_alice, as_charlie, store, published, visibility):
    as_alice.patch(f"{V1}/envs/acme/echo", {"visibility": visibility}, format="json")
    before = list(EnvironmentPackage.objects.filter(organization__slug="acme").values())
    calls = [
        ("get", f"{V1}/envs/acme/echo", None),
        ("patch", f"{V1}/envs/acme/echo", {"description": "mine now"}),
        ("put", f"{V1}/envs/acme/echo/star", None),
        ("delete", f"{V1}/envs/acme/echo/star", None),
        ("post", f"{V1}/envs/acme/echo/fork", {}),
        ("get", f"{V1}/envs/acme/echo/versions/1.2.3/archive", None),
    ]
    for method, url, body in calls:
        resp = getattr(as_charlie, method)(url, body, format="json")
        assert resp.status_code == 404, (method, url, resp.content)
        missing = getattr(as_charlie, method)(url.replace("echo", "nothing"), body, format="json")
        assert resp.json() == json.loads(missing.content.decode().replace("nothing", "echo"))
    assert "echo" not in as_charlie.get(f"{V1}/envs?q=echo").content.decode()
    resp = as_charlie.post(f"{V1}/jobs", job_with("acme/echo@1.2.3"), format="json")
    assert resp.status_code == 400 and "environment.ref" in resp.json()["error"]["fields"]
    assert list(EnvironmentPackage.objects.filter(organization__slug="acme").values()) == before
    assert Star.objects.count() == 0
    assert EnvironmentPackage.objects.filter(organization__slug="globex").count() == 0


def test_bob_sees_his_organizations_package_and_can_star_and_fork_it(as_alice, as_bob, store, published):
    # `organization` visibility: every member sees it (a private one only its publisher and the admins).
    as_alice.patch(f"{V1}/envs/acme/echo", {"visibility": "organization"}, format="json")
    assert as_bob.get(f"{V1}/envs/acme/echo").status_code == 200
    assert as_bob.put(f"{V1}/envs/acme/echo/star").json() == {"starred": True, "stars": 1}
    resp = as_bob.post(f"{V1}/envs/acme/echo/fork", {"name": "echo-bob"}, format="json")
    assert resp.status_code == 201, resp.content
    assert (resp.json()["owner"], resp.json()["forked_from"]) == ("acme", "acme/echo")
    # Forking under the same name into the same organization is a conflict.
    resp = as_bob.post(f"{V1}/envs/acme/echo/fork", {}, format="json")
    assert resp.status_code == 409 and resp.json()["error"]["fields"] == {"name": [mock.ANY]}


def test_public_package_is_seen_starred_and_forked_by_outsider(
    as_alice, as_charlie, charlie, store, published
):
    resp = as_alice.patch(
        f"{V1}/envs/acme/echo", {"visibility": "public", "tags": ["demo", "games"]}, format="json"
    )
    assert resp.status_code == 200 and resp.json()["visibility"] == "public"
    body = as_charlie.get(f"{V1}/envs/acme/echo").json()
    assert body["latest_version"] == "1.2.3"
    assert body["versions"][0]["uploaded_by"] is None  # who in acme published is acme's business
    # Download and star.
    resp = as_charlie.get(f"{V1}/envs/acme/echo/versions/1.2.3/archive")
    assert b"".join(resp.streaming_content) == published
    assert as_charlie.put(f"{V1}/envs/acme/echo/star").json() == {"starred": True, "stars": 1}
    assert as_charlie.put(f"{V1}/envs/acme/echo/star").json() == {"starred": True, "stars": 1}
    assert as_alice.put(f"{V1}/envs/acme/echo/star").json() == {"starred": True, "stars": 2}
    assert as_charlie.get(f"{V1}/envs/acme/echo").json()["starred"] is True
    assert as_charlie.delete(f"{V1}/envs/acme/echo/star").json() == {"starred": False, "stars": 1}
    assert as_charlie.delete(f"{V1}/envs/acme/echo/star").json() == {"starred": False, "stars": 1}
    # He cannot change it, nor overwrite its version.
    resp = as_charlie.patch(f"{V1}/envs/acme/echo", {"description": "mine"}, format="json")
    assert resp.status_code == 404
    # Fork: a private copy in globex, usable by globex's jobs.
    resp = as_charlie.post(f"{V1}/envs/acme/echo/fork", {}, format="json")
    assert resp.status_code == 201, resp.content
    fork = resp.json()
    assert (fork["owner"], fork["name"], fork["visibility"], fork["forked_from"]) == (
        "globex",
        "echo",
        "private",
        "acme/echo",
    )
    assert fork["versions"][0]["status"] == "valid" and fork["versions"][0]["uploaded_by"] == "charlie"
    assert (store / "orgs/globex/envs/echo/1.2.3.tar.gz").read_bytes() == published
    assert as_charlie.post(f"{V1}/jobs", job_with("globex/echo@1.2.3"), format="json").status_code == 201
    # Once acme makes its package private again, the fork no longer names it.
    as_alice.patch(f"{V1}/envs/acme/echo", {"visibility": "private"}, format="json")
    assert as_charlie.get(f"{V1}/envs/globex/echo").json()["forked_from"] is None
    assert as_alice.get(f"{V1}/envs/acme/echo").json()["description"] == "Echoes the prompt"


def test_patch_validation(as_alice, store, published):
    resp = as_alice.patch(f"{V1}/envs/acme/echo", {"tags": ["Not A Tag"]}, format="json")
    assert resp.status_code == 400 and "tags" in resp.json()["error"]["fields"]
    resp = as_alice.patch(f"{V1}/envs/acme/echo", {"visibility": "world"}, format="json")
    assert resp.status_code == 400 and "visibility" in resp.json()["error"]["fields"]
    resp = as_alice.patch(f"{V1}/envs/acme/echo", {"usage_count": 99}, format="json")
    assert resp.status_code == 400 and "usage_count" in resp.json()["error"]["fields"]
    resp = as_alice.patch(f"{V1}/envs/acme/echo", {"description": "New words"}, format="json")
    assert resp.status_code == 200 and resp.json()["description"] == "New words"
    # Built-ins of the opentinker organization are not acme's to change.
    resp = as_alice.patch(f"{V1}/envs/opentinker/arithmetic", {"description": "x"}, format="json")
    assert resp.status_code == 404


def test_builtins_have_no_archive_and_cannot_be_forked(as_alice, store):
    assert as_alice.get(f"{V1}/envs/opentinker/arithmetic/versions/1.0.0/archive").status_code == 404
    resp = as_alice.post(f"{V1}/envs/opentinker/arithmetic/fork", {}, format="json")
    assert resp.status_code == 400 and "built-in" in resp.json()["error"]["message"]
    assert as_alice.get(f"{V1}/envs/acme/nothing/versions/1.0.0/archive").status_code == 404


# ----------------------------------------------------------------------------------------------------
# Search, sort, usage


def test_search_tags_and_sorting(as_alice, as_bob, as_charlie, store, published):
    upload(
        as_alice, package(name="gridworld", description="Walk a grid", tags=["games"]), visibility="public"
    )
    services.package_usage_record(EnvironmentVersion.objects.get(package__name="gridworld"))
    EnvironmentPackage.objects.filter(name="echo").update(usage_count=5)
    as_bob.put(f"{V1}/envs/acme/gridworld/star")

    def names(client, query):
        body = client.get(f"{V1}/envs?{query}").json()
        return [f"{e['owner']}/{e['name']}" for e in body["results"]]

    assert names(as_alice, "q=grid") == ["acme/gridworld"]
    assert names(as_alice, "q=echoes") == ["acme/echo"]  # the description
    assert names(as_alice, "tag=games&q=acme") == ["acme/gridworld"]
    assert "opentinker/tic-tac-toe" in names(as_alice, "tag=games")
    by_stars = names(as_alice, "sort=stars")
    assert by_stars[0] == "acme/gridworld"
    by_usage = names(as_alice, "sort=usage")
    assert by_usage[:2] == ["acme/echo", "acme/gridworld"]
    assert names(as_alice, "sort=recent")[0] == "acme/gridworld"
    assert as_alice.get(f"{V1}/envs?sort=best").status_code == 400
    listed = as_alice.get(f"{V1}/envs?q=grid").json()["results"][0]
    assert (listed["stars"], listed["usage_count"], listed["versions"]) == (1, 1, ["1.2.3"])
    # charlie sees the public one, not the private one.
    assert names(as_charlie, "q=acme") == ["acme/gridworld"]


def test_usage_record_counts_jobs(store, published):
    version = EnvironmentVersion.objects.get(package__name="echo")
    services.package_usage_record(version)
    services.package_usage_record(version)
    assert EnvironmentPackage.objects.get(name="echo").usage_count == 2


def test_archive_path_is_in_the_organization_prefix(store, published):
    v = EnvironmentVersion.objects.get(package__name="echo")
    assert Path(urlparse(v.archive_uri).path) == store / "orgs/acme/envs/echo/1.2.3.tar.gz"
