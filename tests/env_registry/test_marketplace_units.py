"""Registry pieces below the API: S3 storage of archives, README rendering, the validation task."""

from __future__ import annotations

import pytest

from env_registry import storage
from env_registry.readme import render_readme

pytestmark = pytest.mark.django_db


def test_archives_round_trip_through_s3_and_a_forked_upload_downloads(as_alice, s3_store):
    import httpx

    from tests.api.test_envs import package, upload

    s3 = s3_store.client
    uri = storage.archive_uri("acme", "echo", "1.0.0")
    assert uri == "s3://otk-store/store/orgs/acme/envs/echo/1.0.0.tar.gz"
    storage.archive_put(uri, b"bytes")
    assert storage.archive_get(uri) == b"bytes"
    storage.archive_delete(uri)
    assert s3.list_objects_v2(Bucket="otk-store").get("KeyCount") == 0

    data = package()
    resp = upload(as_alice, data)
    assert resp.status_code == 201 and resp.json()["versions"][0]["status"] == "valid", resp.content
    key = "store/orgs/acme/envs/echo/1.2.3.tar.gz"
    assert s3.get_object(Bucket="otk-store", Key=key)["Body"].read() == data
    r = as_alice.get("/api/v1/envs/acme/echo/versions/1.2.3/archive")
    assert r.status_code == 302 and r["Location"].startswith(f"{s3_store.endpoint}/otk-store/{key}?")
    assert httpx.get(r["Location"]).content == data


def test_storage_refuses_uris_outside_the_store(settings, tmp_path):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'store'}"
    with pytest.raises(ValueError, match="outside the object store"):
        storage.archive_put(f"file://{tmp_path}/elsewhere.tar.gz", b"x")
    assert not (tmp_path / "elsewhere.tar.gz").exists()


@pytest.mark.parametrize(
    ("source", "html"),
    [
        ("# Title\n\ntext", "<h1>Title</h1>\n<p>text</p>"),
        ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
        ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
        ('```\n<b>"hi"</b>\n```', "<pre><code>&lt;b&gt;&quot;hi&quot;&lt;/b&gt;</code></pre>"),
        ("- `a<b`\n- **c&d**", "<ul><li><code>a&lt;b</code></li><li><strong>c&amp;d</strong></li></ul>"),
        ('## "quoted" ##', "<h2>&quot;quoted&quot;</h2>"),
        ("", ""),
    ],
)
def test_readme_is_rendered_with_everything_escaped(source, html):
    assert render_readme(source) == html


def test_validation_of_a_missing_or_finished_version_is_a_no_op():
    from workers.env_tasks import validate_version_task

    assert validate_version_task.run(2_000_000_000) == "missing"


def test_a_host_without_a_sandbox_leaves_the_version_pending_not_invalid(as_alice, monkeypatch, tmp_path):
    """No bubblewrap on the validating host is the host's fault: the upload stands, the version stays pending
    with the reason (nothing of the package ran), the Celery task retries, and a later run on a host that can
    isolate validates it."""
    from env_registry.models import EnvironmentVersion
    from env_registry.services import version_validate
    from opentinker.env.sandbox import SandboxUnavailable
    from tests.api.test_envs import package, upload
    from workers.env_tasks import validate_version_task

    monkeypatch.setenv("OPENTINKER_BWRAP", str(tmp_path / "no-such-bwrap"))
    resp = upload(as_alice, package())
    assert resp.status_code == 201, resp.content
    (v,) = resp.json()["versions"]
    assert v["status"] == "pending"
    version = EnvironmentVersion.objects.get(package__name="echo", version=v["version"])
    assert version.validation_error.startswith("not validated yet: OPENTINKER_BWRAP=")
    assert SandboxUnavailable in validate_version_task.autoretry_for
    with pytest.raises(SandboxUnavailable):
        validate_version_task.run(version.pk)
    monkeypatch.delenv("OPENTINKER_BWRAP")
    assert version_validate(version.pk).status == "valid"
