"""Object storage for checkpoints and artifacts: a local directory (`file://`) or S3 (`s3://`).

The platform only reads here (download links); the runtime writes. A URI is only ever served when it lies
under the configured OBJECT_STORE_URL, so a forged checkpoint record cannot make the API read arbitrary files.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from django.conf import settings

from portal.errors import NotFound


def _join(uri: str, name: str) -> str:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not name:
        raise NotFound("no such file")
    return uri.rstrip("/") + "/" + str(rel)


def _inside_store(uri: str) -> bool:
    root = settings.OBJECT_STORE_URL.rstrip("/") + "/"
    return uri.startswith(root)


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
