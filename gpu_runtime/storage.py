"""Object storage for checkpoints, models and datasets: `file://` directories and `s3://` prefixes.

The runtime's way into `opentinker.storage` (which holds the scheme branching): its S3 endpoint comes from
the job's environment (`AWS_ENDPOINT_URL`), and no root is imposed, since the platform checked every URI in
the spec against the organization's prefix at submission.

A checkpoint is written to a local staging directory first and then published as a whole, so a reader never
sees half a checkpoint: `file://` renames the finished directory into place; `s3://` uploads the marker file
(`meta.json`) last.
"""

from __future__ import annotations

import os
from pathlib import Path

from opentinker.storage import ObjectStore, join

__all__ = [
    "delete",
    "download_prefix",
    "join",
    "list_dirs",
    "publish_dir",
    "read_bytes",
    "remove_dir",
    "write_bytes",
]


def _store(endpoint_url: str | None = None) -> ObjectStore:
    return ObjectStore(endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)


def publish_dir(local: Path, uri: str) -> None:
    """Make the finished directory `local` visible at `uri` (replacing what was there)."""
    _store().publish_dir(local, uri)


def list_dirs(prefix: str) -> list[str]:
    """Names of the complete checkpoint directories directly under `prefix` (those with a meta.json)."""
    return _store().list_dirs(prefix)


def remove_dir(uri: str) -> None:
    _store().remove_dir(uri)


def download_prefix(uri: str) -> Path:
    """A local directory with the contents at `uri` (the path itself for file://)."""
    return _store().download_dir(uri)


def read_bytes(uri: str) -> bytes:
    """The contents of one object (a dataset file): `file://` path or `s3://bucket/key`."""
    return _store().get(uri)


def delete(uri: str) -> None:
    """Remove one object; one that is not there is not an error."""
    _store().delete(uri)


def write_bytes(uri: str, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Store one object (a dataset file) at `uri`, replacing it: a reader sees the old or the new one."""
    _store(endpoint_url).put(uri, data)
