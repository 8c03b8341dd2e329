"""Package archives in object storage: `file://` (a local directory, dev and tests) or `s3://` (boto3).

Archives live under their organization's prefix, `<org prefix>/envs/<name>/<version>.tar.gz`, and every URI is
checked to lie inside OBJECT_STORE_URL before it is written, read or deleted.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings

from portal import storage


def archive_uri(org_slug: str, name: str, version: str) -> str:
    return storage.file_uri(storage.organization_prefix(org_slug), f"envs/{name}/{version}.tar.gz")


def _local(uri: str) -> Path:
    path = Path(urlparse(uri).path).resolve()
    root = Path(urlparse(settings.OBJECT_STORE_URL).path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{uri} is outside the object store")
    return path


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def archive_put(uri: str, data: bytes) -> None:
    """Write atomically (a reader never sees half an archive)."""
    if uri.startswith("s3://"):
        bucket, key = _bucket_key(uri)
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/gzip")
        return
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def archive_get(uri: str) -> bytes:
    if uri.startswith("s3://"):
        bucket, key = _bucket_key(uri)
        return storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return _local(uri).read_bytes()


def archive_delete(uri: str) -> None:
    if uri.startswith("s3://"):
        bucket, key = _bucket_key(uri)
        storage.s3_client().delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        _local(uri).unlink()
