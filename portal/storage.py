"""Object storage for checkpoints and artifacts: a local directory (`file://`) or S3 (`s3://`).

The platform's way into `opentinker.storage` (which holds the scheme branching): the store is
OBJECT_STORE_URL, reached at S3_ENDPOINT_URL. The platform only reads here (download links); the runtime
writes. A URI is only ever served when it lies under OBJECT_STORE_URL, so a forged checkpoint record cannot
make the API read arbitrary files.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from opentinker import storage as objects
from opentinker.storage import ObjectStore, normalize
from portal.errors import NotFound

__all__ = [
    "file_uri",
    "local_path",
    "normalize",
    "organization_may_read",
    "organization_prefix",
    "presigned_url",
    "store",
]


def store() -> ObjectStore:
    """The platform's object store; a `file://` path outside OBJECT_STORE_URL is refused (OutsideStore)."""
    return ObjectStore(endpoint_url=settings.S3_ENDPOINT_URL, root=settings.OBJECT_STORE_URL)


def organization_prefix(slug: str) -> str:
    """Where an organization's uploads, checkpoints and artifacts live; its jobs may read only here."""
    return f"{normalize(settings.OBJECT_STORE_URL)}/orgs/{slug}"


def organization_may_read(uri: str, slug: str) -> bool:
    return objects.is_under(uri, organization_prefix(slug))


def file_uri(prefix_uri: str, name: str) -> str:
    """`prefix_uri/name`, a 404 unless it stays below the prefix and inside the store."""
    try:
        uri = objects.child(prefix_uri, name)
    except objects.OutsideStore:
        raise NotFound("no such file") from None
    if not objects.is_under(uri, settings.OBJECT_STORE_URL):
        raise NotFound("no such file")
    return uri


def local_path(uri: str) -> Path:
    """The on-disk path of a file:// URI inside the store; a 404 for anything else."""
    try:
        path = store().path(uri)
    except ValueError:  # outside the store, or not a file:// URI
        raise NotFound("no such file") from None
    if not path.is_file():
        raise NotFound("no such file")
    return path


def presigned_url(uri: str, *, expires: int | None = None) -> str:
    return store().presigned_url(uri, expires=expires or settings.OBJECT_STORE_LINK_SECONDS)
