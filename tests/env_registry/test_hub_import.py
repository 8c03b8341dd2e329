"""Importing a Hub repository into the registry, tested against a local mirror directory (this machine
cannot reach the Hugging Face Hub: the HubFetcher path, huggingface_hub's snapshot_download, is untested)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from env_registry.hub_import import MirrorFetcher, model_import
from env_registry.models import ModelVersion, RegisteredModel
from portal.errors import DomainError
from tests.api.test_registry import stored_files, tiny_model_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def mirror(tmp_path, settings):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"
    settings.HUB_IMPORT_ALLOW = ["tiny-org/*"]
    settings.ENV_VALIDATION_MODE = "celery"  # the sandbox's check is tests/api/test_registry.py's
    repo = tmp_path / "mirror" / "tiny-org" / "tiny-llm"
    repo.mkdir(parents=True)
    files = tiny_model_files()
    for name, data in files.items():
        (repo / name).write_bytes(data)
    # What a Hub repository may also hold: never fetched.
    (repo / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (repo / "modeling_tiny.py").write_text("import os\n")
    return tmp_path / "mirror", files


def test_an_allow_listed_repo_is_imported_without_its_pickles_or_code(acme, mirror, tmp_path):
    root, files = mirror
    version = model_import(
        organization=acme, user=None, repo_id="tiny-org/tiny-llm", name="tiny", fetcher=MirrorFetcher(root)
    )
    assert (version.version, version.status) == (1, "pending")
    assert sorted(f["path"] for f in version.files) == sorted(files)
    assert version.info["source"] == "hf://tiny-org/tiny-llm" and version.info["parameters"] == 28960
    assert version.model.description == "imported from tiny-org/tiny-llm"
    assert stored_files(tmp_path / "objects") == sorted(f"orgs/acme/models/tiny/1/{n}" for n in files)


def test_a_repo_off_the_allow_list_or_with_remote_code_is_refused_and_nothing_stored(acme, mirror, tmp_path):
    root, files = mirror
    with pytest.raises(DomainError, match=r"not on this server's import allow-list \(HUB_IMPORT_ALLOW\)"):
        model_import(organization=acme, user=None, repo_id="other/x", name="x", fetcher=MirrorFetcher(root))
    config = {**json.loads(files["config.json"]), "auto_map": {"AutoModelForCausalLM": "modeling_tiny.T"}}
    (root / "tiny-org" / "tiny-llm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DomainError, match=r"tiny-org/tiny-llm: config\.json has 'auto_map'"):
        model_import(
            organization=acme,
            user=None,
            repo_id="tiny-org/tiny-llm",
            name="tiny",
            fetcher=MirrorFetcher(root),
        )
    assert RegisteredModel.objects.count() == 0 and ModelVersion.objects.count() == 0
    assert stored_files(tmp_path / "objects") == []


def test_management_command(acme, mirror):
    root, _ = mirror
    out = StringIO()
    call_command(
        "registry_import_model",
        "acme",
        "tiny-org/tiny-llm",
        "--name",
        "tiny",
        "--mirror",
        str(root),
        stdout=out,
    )
    assert out.getvalue().strip() == "imported tiny-org/tiny-llm as acme/tiny@1: pending"
    with pytest.raises(CommandError, match="no organization 'nope'"):
        call_command(
            "registry_import_model", "nope", "tiny-org/tiny-llm", "--name", "t", "--mirror", str(root)
        )


def test_a_mirror_revision_never_leads_out_of_the_repository_through_a_symlink(mirror, tmp_path):
    root, _ = mirror
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"secret": 1}')
    (root / "tiny-org" / "tiny-llm" / "elsewhere").symlink_to(outside)  # a link the repository holds
    fetcher = MirrorFetcher(root)
    with pytest.raises(DomainError, match="is not in the mirror"):
        fetcher.list_files("tiny-org/tiny-llm", "elsewhere")
    with pytest.raises(DomainError, match="is not in the mirror"):
        fetcher.fetch("tiny-org/tiny-llm", "elsewhere", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    (root / "tiny-org" / "tiny-llm" / "main").mkdir()  # a revision that is a directory of the repository
    (root / "tiny-org" / "tiny-llm" / "main" / "config.json").write_text("{}")
    assert fetcher.list_files("tiny-org/tiny-llm", "main") == {"config.json": 2}


def test_a_repo_over_the_quota_is_refused_before_any_byte_is_fetched(acme, mirror, settings, tmp_path):
    root, files = mirror
    fetched = []

    class Watched(MirrorFetcher):
        def fetch(self, repo_id, revision, dest):
            fetched.append(repo_id)
            super().fetch(repo_id, revision, dest)

    # what would be fetched: the model's files, not the pickle or the code, which are never fetched
    wanted = sum(len(data) for data in files.values())
    settings.REGISTRY_MAX_BYTES = wanted - 1
    with pytest.raises(DomainError, match=rf"tiny-org/tiny-llm is {wanted} bytes; .* \(REGISTRY_MAX_BYTES\)"):
        model_import(
            organization=acme, user=None, repo_id="tiny-org/tiny-llm", name="t", fetcher=Watched(root)
        )
    assert fetched == [] and ModelVersion.objects.count() == 0
    settings.REGISTRY_MAX_BYTES = wanted
    version = model_import(
        organization=acme, user=None, repo_id="tiny-org/tiny-llm", name="t", fetcher=Watched(root)
    )
    assert fetched == ["tiny-org/tiny-llm"] and version.size_bytes == wanted
