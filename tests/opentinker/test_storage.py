"""The one object-storage module (`opentinker.storage`), the same operations on both schemes: a temporary
directory for `file://` and moto's S3 server (over HTTP, through boto3) for `s3://`.

What the callers rely on: one object's put/get/delete (archives, datasets), a directory published whole with
its marker last and listed only once complete (checkpoints), downloaded and removed; names that climb out of
their prefix and `file://` paths outside the store refused before anything is touched.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from opentinker import storage
from opentinker.storage import ObjectStore, OutsideStore, UnsupportedURI


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> tuple[ObjectStore, str]:
    """(the store, its base URI)."""
    if request.param == "file":
        base = f"file://{tmp_path / 'store'}"
        return ObjectStore(root=base), base
    s3 = request.getfixturevalue("s3_store")
    base = f"s3://{s3.bucket}/store"
    return ObjectStore(endpoint_url=s3.endpoint, root=base), base


def staged(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    local = tmp_path / "staging" / name
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    return local


def test_one_object_is_put_replaced_read_and_deleted(store):
    objects, base = store
    uri = storage.join(base, "orgs/acme/envs/echo/1.0.0.tar.gz")
    objects.put(uri, b"first")
    assert objects.get(uri) == b"first"
    objects.put(uri, b"second")
    assert objects.get(uri) == b"second"
    objects.delete(uri)
    objects.delete(uri)  # gone already: not an error
    with pytest.raises(Exception):  # noqa: B017 -- FileNotFoundError or botocore's NoSuchKey
        objects.get(uri)


def test_a_file_put_leaves_no_temporary_file_beside_it(tmp_path):
    objects = ObjectStore(root=f"file://{tmp_path}")
    objects.put(f"file://{tmp_path}/a/data.jsonl", b"{}\n")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["data.jsonl"]


def test_an_s3_put_keeps_its_content_type_and_a_link_downloads_it(s3_store):
    objects = ObjectStore(endpoint_url=s3_store.endpoint)
    objects.put("s3://otk-store/store/a.tar.gz", b"gz", content_type="application/gzip")
    head = s3_store.client.head_object(Bucket="otk-store", Key="store/a.tar.gz")
    assert head["ContentType"] == "application/gzip"
    link = objects.presigned_url("s3://otk-store/store/a.tar.gz", expires=60)
    assert link.startswith(f"{s3_store.endpoint}/otk-store/store/a.tar.gz?")
    assert httpx.get(link).content == b"gz"
    with pytest.raises(UnsupportedURI, match="names no object"):
        objects.put("s3://otk-store", b"x")


def test_directories_are_listed_only_once_complete_then_downloaded_and_removed(store, tmp_path):
    objects, base = store
    prefix = storage.join(base, "orgs/acme/jobs/7")
    for step in (1, 2):
        meta = b'{"step": %d}' % step
        files = {"model.safetensors": b"w%d" % step, "tok/vocab.json": b"{}", "meta.json": meta}
        local = staged(tmp_path, f"s{step}", files)
        objects.publish_dir(local, storage.join(prefix, f"step_00000{step}"))
        assert not local.exists()  # published whole: the staging copy is gone
    # A directory without its marker (an upload cut short) is not a checkpoint.
    objects.put(storage.join(prefix, "step_000003/model.safetensors"), b"half")
    assert objects.list_dirs(prefix) == ["step_000001", "step_000002"]
    assert objects.list_dirs(storage.join(base, "nothing-here")) == []

    got = objects.download_dir(storage.join(prefix, "step_000002"))
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()) == [
        "meta.json",
        "model.safetensors",
        "tok/vocab.json",
    ]
    assert (got / "model.safetensors").read_bytes() == b"w2"

    objects.remove_dir(storage.join(prefix, "step_000001"))
    objects.remove_dir(storage.join(prefix, "step_000009"))  # not there: not an error
    assert objects.list_dirs(prefix) == ["step_000002"]
    assert objects.get(storage.join(prefix, "step_000002/meta.json")) == b'{"step": 2}'


def test_a_directory_is_replaced_whole(store, tmp_path):
    objects, base = store
    uri = storage.join(base, "ck/step_000001")
    objects.publish_dir(staged(tmp_path, "a", {"old.bin": b"1", "meta.json": b"{}"}), uri)
    objects.publish_dir(staged(tmp_path, "b", {"new.bin": b"2", "meta.json": b"{}"}), uri)
    got = objects.download_dir(uri)
    assert sorted(p.name for p in got.iterdir()) == ["meta.json", "new.bin"]  # the old file is gone
    if base.startswith("file://"):  # swapped in by renames: nothing staged is left beside it
        assert sorted(p.name for p in objects.path(storage.join(base, "ck")).iterdir()) == ["step_000001"]


def test_a_directory_being_swapped_in_is_never_listed(tmp_path):
    objects = ObjectStore(root=f"file://{tmp_path}")
    (tmp_path / "ck" / ".step_000002.in-abc").mkdir(parents=True)
    (tmp_path / "ck" / ".step_000002.in-abc" / "meta.json").write_text("{}")
    objects.publish_dir(staged(tmp_path, "a", {"meta.json": b"{}"}), f"file://{tmp_path}/ck/step_000001")
    assert objects.list_dirs(f"file://{tmp_path}/ck") == ["step_000001"]


@pytest.mark.parametrize("name", ["../other-org/secret", "a/../../x", "/etc/passwd", ""])
def test_a_name_may_not_climb_out_of_its_prefix(name):
    with pytest.raises(OutsideStore):
        storage.child("file:///store/orgs/acme", name)


def test_file_paths_outside_the_store_are_refused_before_anything_is_touched(tmp_path):
    root = tmp_path / "store"
    (root / "orgs").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"s")
    (root / "orgs" / "link").symlink_to(tmp_path / "secret")
    objects = ObjectStore(root=f"file://{root}")
    for uri in (f"file://{root}/../secret", f"file://{root}/orgs/link", f"file://{tmp_path}/store-other/x"):
        with pytest.raises(OutsideStore, match="outside the object store"):
            objects.get(uri)
        with pytest.raises(OutsideStore):
            objects.put(uri, b"x")
        with pytest.raises(OutsideStore):
            objects.delete(uri)
    assert (tmp_path / "secret").read_bytes() == b"s"
    assert not (tmp_path / "store-other").exists()
    # An s3 store has no local files at all.
    with pytest.raises(OutsideStore):
        ObjectStore(root="s3://bucket/store").path(f"file://{root}/orgs/x")
    # The runtime's store has no root: the platform checked its URIs at submission.
    assert ObjectStore().get(f"file://{tmp_path}/secret") == b"s"


def test_a_link_inside_the_store_never_serves_another_place_in_it(tmp_path):
    # A job writes its own checkpoint folder: a link it leaves there must not reach another organization's
    # files, although they lie inside the store too (the API serves checkpoint files by their URI).
    root = tmp_path / "store"
    (root / "orgs" / "2" / "ckpt").mkdir(parents=True)
    (root / "orgs" / "1" / "ckpt").mkdir(parents=True)
    (root / "orgs" / "2" / "ckpt" / "model.safetensors").write_bytes(b"theirs")
    (root / "orgs" / "1" / "ckpt" / "model.safetensors").symlink_to(
        root / "orgs" / "2" / "ckpt" / "model.safetensors"
    )
    (root / "orgs" / "1" / "linked").symlink_to(root / "orgs" / "2")
    objects = ObjectStore(root=f"file://{root}")
    for uri in (
        f"file://{root}/orgs/1/ckpt/model.safetensors",
        f"file://{root}/orgs/1/linked/ckpt/model.safetensors",
    ):
        with pytest.raises(OutsideStore, match="outside the object store"):
            objects.get(uri)
    assert objects.get(f"file://{root}/orgs/2/ckpt/model.safetensors") == b"theirs"
    # A store whose root is itself reached through a link works, under either name.
    (tmp_path / "alias").symlink_to(root)
    aliased = ObjectStore(root=f"file://{tmp_path}/alias")
    assert aliased.get(f"file://{tmp_path}/alias/orgs/2/ckpt/model.safetensors") == b"theirs"
    assert aliased.get(f"file://{root}/orgs/2/ckpt/model.safetensors") == b"theirs"
    aliased.put(f"file://{tmp_path}/alias/orgs/3/new", b"n")
    assert (root / "orgs" / "3" / "new").read_bytes() == b"n"


def test_other_schemes_are_refused():
    objects = ObjectStore()
    for call in (
        lambda: objects.get("http://example.com/x"),
        lambda: objects.put("gs://bucket/x", b""),
        lambda: objects.list_dirs("/plain/path"),
        lambda: storage.file_path("s3://bucket/key"),
    ):
        with pytest.raises(UnsupportedURI):
            call()


def test_prefixes_compare_whole_segments():
    assert storage.normalize("s3://b/store//orgs/./acme/") == "s3://b/store/orgs/acme"
    assert storage.is_under("file:///store/orgs/acme/x", "file:///store/orgs/acme")
    assert not storage.is_under("file:///store/orgs/acme-evil/x", "file:///store/orgs/acme")
    assert not storage.is_under("file:///store/orgs/acme/../globex/x", "file:///store/orgs/acme")
    assert not storage.is_under("s3://other/store/x", "s3://b/store")
