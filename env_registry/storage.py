"""Package archives in object storage: `file://` (a local directory, dev and tests) or `s3://`.

Archives live under their organization's prefix, `<org prefix>/envs/<name>/<version>.tar.gz` (built by
`archive_uri`, which refuses a name that leaves it), and a `file://` path is resolved and checked to lie
inside OBJECT_STORE_URL before it is written, read or deleted (`portal.storage.store`; the scheme branching
is in `opentinker.storage`).
"""

from __future__ import annotations

from portal import storage


def archive_uri(org_slug: str, name: str, version: str) -> str:
    return storage.file_uri(storage.organization_prefix(org_slug), f"envs/{name}/{version}.tar.gz")


def archive_put(uri: str, data: bytes) -> None:
    """Write atomically (a reader never sees half an archive)."""
    storage.store().put(uri, data, content_type="application/gzip")


def archive_get(uri: str) -> bytes:
    return storage.store().get(uri)


def archive_delete(uri: str) -> None:
    storage.store().delete(uri)
