"""Object storage for checkpoints and artifacts: a local directory (`file://`) or S3 (`s3://`).

The platform only reads here (download links); the runtime writes. A URI is only ever served when it lies
under the configured OBJECT_STORE_URL, so a forged checkpoint record cannot make the API read arbitrary files.
"""

from __future__ import annotations

import posixpath
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from django.conf import settings

from portal.errors import NotFound


def _join(uri: str, name: str) -> str:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not name:
        raise NotFound("no such file")
    return uri.rstrip("/") + "/" + str(rel)


def normalize(uri: str) -> str:
    """`scheme://netloc/path` with `.`, `..` and doubled slashes resolved, and no trailing slash."""
    parsed = urlparse(uri)
    path = posixpath.normpath("/" + parsed.path.lstrip("/")) if parsed.path else "/"
    return f"{parsed.scheme}://{parsed.netloc}{path.rstrip('/')}"


def _under(uri: str, prefix: str) -> bool:
    # Compare whole path segments: `store-other/` is not inside `store/`.
    return normalize(uri).startswith(normalize(prefix) + "/")


def _inside_store(uri: str) -> bool:
    return _under(uri, settings.OBJECT_STORE_URL)


def organization_prefix(slug: str) -> str:
    """Where an organization's uploads, checkpoints and artifacts live; its jobs may read only here."""
    return f"{normalize(settings.OBJECT_STORE_URL)}/orgs/{slug}"


def organization_may_read(uri: str, slug: str) -> bool:
    return _under(uri, organization_prefix(slug))


def file_uri(prefix_uri: str, name: str) -> str:
    uri = _join(prefix_uri, name)
    if not _inside_store(uri):
        raise NotFound("no such file")
    return uri


def local_path(uri: str) -> Path:
    """The on-disk path of a file:// URI inside the store."""
    parsed = urlparse(uri)
    path = Path(parsed.path).resolve()
    root = Path(urlparse(settings.OBJECT_STORE_URL).path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFound("no such file")
    return path


def s3_client():
    import boto3  # imported lazily: only S3 deployments pay for it

    return boto3.client("s3", endpoint_url=settings.S3_ENDPOINT_URL)


def presigned_url(uri: str, *, expires: int | None = None) -> str:
    parsed = urlparse(uri)
    return s3_client().generate_presigned_url(
        "get_object",
        Params={"Bucket": parsed.netloc, "Key": parsed.path.lstrip("/")},
        ExpiresIn=expires or settings.OBJECT_STORE_LINK_SECONDS,
    )
