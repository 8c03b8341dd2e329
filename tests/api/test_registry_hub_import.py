"""Importing an allow-listed Hugging Face Hub repository through the API (POST /org/model-imports): the
request reserves a pending version and enqueues the task; the task (env_registry.hub_import.model_import_run,
run here in the test's process as the Celery worker would) fetches from HUB_ENDPOINT, here a `file://` local
mirror directory: this machine cannot reach the Hub. Actors: alice (owner of acme) imports, bob (member) gets
403, charlie (globex) sees nothing of acme's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from env_registry.hub_import import model_import_run
from env_registry.models import ModelVersion, RegisteredModel
from opentinker.spec import example_rl_spec
from tests.api.test_registry import V1, error_of, stored_files
from tests.tiny_model import tiny_model_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def mirror(tmp_path, settings) -> Path:
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    settings.HUB_ENDPOINT = f"file://{tmp_path / 'mirror'}"
    settings.HUB_IMPORT_ALLOW = ["tiny-org/*"]
    files = tiny_model_files()
    for repo in ("tiny-llm", "remote-code", "pickled"):
        (tmp_path / "mirror" / "tiny-org" / repo).mkdir(parents=True)
        for name, data in files.items():
            if not (repo == "pickled" and name.endswith(".safetensors")):
                (tmp_path / "mirror" / "tiny-org" / repo / name).write_bytes(data)
    (tmp_path / "mirror/tiny-org/tiny-llm/pytorch_model.bin").write_bytes(b"\x80\x04pickle")  # never fetched
    (tmp_path / "mirror/tiny-org/pickled/pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    config = {**json.loads(files["config.json"]), "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}
    (tmp_path / "mirror/tiny-org/remote-code/config.json").write_text(json.dumps(config))
    (tmp_path / "mirror/tiny-org/remote-code/modeling_x.py").write_text("import os\n")
    return tmp_path


def start(client, repo: str, name: str, **extra):
    return client.post(f"{V1}/org/model-imports", {"repo": repo, "name": name, **extra}, format="json")


def test_an_admin_imports_an_allow_listed_repo_in_the_background(
    as_alice, as_bob, as_charlie, mirror, django_capture_on_commit_callbacks
):
    assert start(as_bob, "tiny-org/tiny-llm", "tiny").status_code == 403  # members may not import
    with django_capture_on_commit_callbacks(execute=False) as queued:
        resp = start(as_alice, "tiny-org/tiny-llm", "tiny")
    assert resp.status_code == 202, resp.content
    assert len(queued) == 1  # the import task, sent once the request's transaction commits
    body = resp.json()
    assert body["ref"] == "acme/tiny@1"
    assert (body["model"]["status"], body["model"]["info"]["import"], body["model"]["files"]) == (
        "pending",
        "queued",
        [],
    )
    assert body["model"]["validation_error"] == "importing tiny-org/tiny-llm"
    assert stored_files(mirror / "objects") == []  # nothing fetched in the request

    version = model_import_run(ModelVersion.objects.get().pk)  # the task; validated inline (embedded mode)
    assert version is not None and (version.status, version.validation_error) == ("valid", "")
    files = tiny_model_files()
    assert sorted(f["path"] for f in version.files) == sorted(files)  # no pickle fetched
    assert version.info["import"] == "done" and version.info["parameters"] == 28960
    for name, data in files.items():
        assert (mirror / "objects/orgs/acme/models/tiny/1" / name).read_bytes() == data
    assert model_import_run(version.pk) == version  # delivered twice: imported once
    listed = as_alice.get(f"{V1}/org/models/tiny").json()["versions"]
    assert [(v["ref"], v["status"]) for v in listed] == [("acme/tiny@1", "valid")]
    assert as_charlie.get(f"{V1}/org/models/tiny").status_code == 404


@pytest.mark.parametrize(
    ("repo", "reason"),
    [
        ("tiny-org/remote-code", "tiny-org/remote-code: config.json has 'auto_map': models that need remote"),
        ("tiny-org/pickled", "tiny-org/pickled has pickle weights only (pytorch_model.bin)"),
        ("tiny-org/absent", "tiny-org/absent is not in the mirror"),
    ],
)
def test_a_refused_repo_leaves_an_invalid_version_with_the_reason_and_no_file(
    as_alice, mirror, repo, reason, settings
):
    settings.ENV_VALIDATION_MODE = "celery"
    resp = start(as_alice, repo, "x")
    assert resp.status_code == 202, resp.content
    version = model_import_run(ModelVersion.objects.get().pk)
    assert version is not None and version.status == "invalid"
    assert version.validation_error.startswith(reason), version.validation_error
    assert (version.files, version.size_bytes, version.info["import"]) == ([], 0, "refused")
    assert stored_files(mirror / "objects") == []
    spec = example_rl_spec().model_dump(mode="json")
    resp = as_alice.post(f"{V1}/jobs", {**spec, "model": {"base": "acme/x@1"}}, format="json")
    assert resp.status_code == 400 and "acme/x@1 is invalid, not valid" in error_of(resp), resp.content


def test_requests_refused_at_once_store_nothing(as_alice, mirror, settings):
    resp = start(as_alice, "other-org/model", "x")
    assert resp.status_code == 400
    assert error_of(resp) == "other-org/model is not on this server's import allow-list (HUB_IMPORT_ALLOW)"
    assert start(as_alice, "https://evil.example/x", "x").status_code == 400
    resp = start(as_alice, "tiny-org/tiny-llm", "x", revision="../../etc")
    assert resp.status_code == 400 and "revision" in error_of(resp)
    assert start(as_alice, "tiny-org/tiny-llm", "Bad Name").status_code == 400
    assert RegisteredModel.objects.count() == 0 and ModelVersion.objects.count() == 0
    assert stored_files(mirror / "objects") == []


def test_a_store_failure_while_publishing_leaves_the_import_queued_for_the_retry(
    as_alice, mirror, monkeypatch
):
    from opentinker.storage import ObjectStore

    publish = ObjectStore.publish_dir

    def half_then_fail(self, local, uri, **kw):  # the store fails after some files went in
        (mirror / "objects/orgs/acme/models/tiny/1").mkdir(parents=True)
        (mirror / "objects/orgs/acme/models/tiny/1/config.json").write_text("{}")
        raise OSError("the store went away")

    assert start(as_alice, "tiny-org/tiny-llm", "tiny").status_code == 202
    pk = ModelVersion.objects.get().pk
    monkeypatch.setattr(ObjectStore, "publish_dir", half_then_fail)
    with pytest.raises(OSError, match="the store went away"):
        model_import_run(pk)  # the task raises: Celery retries it (autoretry_for OSError)
    version = ModelVersion.objects.get(pk=pk)
    assert (version.status, version.info["import"], version.files) == ("pending", "queued", [])
    assert version.validation_error == "not imported yet: OSError: the store went away"
    assert stored_files(mirror / "objects") == []
    monkeypatch.setattr(ObjectStore, "publish_dir", publish)
    version = model_import_run(pk)  # the retry
    assert version is not None and (version.status, version.info["import"]) == ("valid", "done")


def test_two_imports_running_at_once_cannot_both_take_the_last_free_bytes(
    as_alice, mirror, monkeypatch, settings
):
    from opentinker.storage import ObjectStore

    size = sum(len(data) for data in tiny_model_files().values())
    settings.REGISTRY_MAX_BYTES = size + size // 2  # room for one import
    assert start(as_alice, "tiny-org/tiny-llm", "one").status_code == 202
    assert start(as_alice, "tiny-org/tiny-llm", "two").status_code == 202
    one, two = ModelVersion.objects.order_by("pk").values_list("pk", flat=True)
    publish, runs = ObjectStore.publish_dir, []

    def the_other_runs_meanwhile(self, local, uri, **kw):  # two's task runs while one's files go in
        if not runs:
            runs.append(None)  # once: two's own publishing does not start it again
            runs[0] = model_import_run(two)
        publish(self, local, uri, **kw)

    monkeypatch.setattr(ObjectStore, "publish_dir", the_other_runs_meanwhile)
    first = model_import_run(one)
    assert first is not None and (first.info["import"], first.size_bytes) == ("done", size)
    second = runs[0]
    assert second is not None and (second.status, second.info["import"], second.size_bytes) == (
        "invalid",
        "refused",
        0,
    )
    assert second.validation_error.startswith(f"tiny-org/tiny-llm is {size} bytes;")
    assert stored_files(mirror / "objects") == sorted(
        f"orgs/acme/models/one/1/{n}" for n in tiny_model_files()
    )


def test_at_most_four_imports_of_an_organization_are_in_flight(as_alice, as_charlie, mirror):
    for i in range(4):
        assert start(as_alice, "tiny-org/tiny-llm", f"m{i}").status_code == 202
    resp = start(as_alice, "tiny-org/tiny-llm", "m4")
    assert resp.status_code == 429
    assert error_of(resp) == (
        "your organization has 4 imports queued or running (at most 4): wait for them to finish"
    )
    assert ModelVersion.objects.count() == 4
    resp = start(as_charlie, "tiny-org/tiny-llm", "m0")  # globex's imports are counted apart
    assert resp.status_code == 202 and resp.json()["ref"] == "globex/m0@1"
    first = ModelVersion.objects.filter(model__organization__slug="acme").order_by("pk").first()
    assert first is not None and model_import_run(first.pk).info["import"] == "done"  # one finished
    assert start(as_alice, "tiny-org/tiny-llm", "m4").status_code == 202
