"""Object storage for checkpoints and models: `file://` directories and `s3://` prefixes (boto3).

A checkpoint is written to a local staging directory first and then published as a whole, so a reader never
sees half a checkpoint: `file://` renames the finished directory into place; `s3://` uploads the marker file
(`meta.json`) last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _s3_split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/")


def _s3(endpoint_url: str | None = None):
    import boto3  # lazy: only s3:// jobs need it

    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


def publish_dir(local: Path, uri: str) -> None:
    """Make the finished directory `local` visible at `uri` (replacing what was there)."""
    if uri.startswith("file://"):
        dest = Path(uri.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(local), dest)
        return
    if uri.startswith("s3://"):
        bucket, key = _s3_split(uri)
        client = _s3()
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for p in sorted(files, key=lambda p: p.name == "meta.json"):  # the marker goes last
            client.upload_file(str(p), bucket, f"{key}/{p.relative_to(local)}")
        shutil.rmtree(local)
        return
    raise ValueError(f"unsupported storage URI {uri!r}")


def list_dirs(prefix: str) -> list[str]:
    """Names of the complete checkpoint directories directly under `prefix` (those with a meta.json)."""
    if prefix.startswith("file://"):
        root = Path(prefix.removeprefix("file://"))
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())
    if prefix.startswith("s3://"):
        bucket, key = _s3_split(prefix)
        names = set()
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(key) + 1 :]
                if rel.count("/") == 1 and rel.endswith("/meta.json"):
                    names.add(rel.split("/")[0])
        return sorted(names)
    raise ValueError(f"unsupported storage URI {prefix!r}")


def remove_dir(uri: str) -> None:
    if uri.startswith("file://"):
        shutil.rmtree(Path(uri.removeprefix("file://")), ignore_errors=True)
    elif uri.startswith("s3://"):
        bucket, key = _s3_split(uri)
        client = _s3()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])


def download_prefix(uri: str) -> Path:
    """A local directory with the contents at `uri` (the path itself for file://)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    bucket, key = _s3_split(uri)
    dest = Path(tempfile.mkdtemp(prefix="otk-"))
    client = _s3()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
        for obj in page.get("Contents", []):
            target = dest / obj["Key"][len(key) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
    return dest


def read_bytes(uri: str) -> bytes:
    """The contents of one object (a dataset file): `file://` path or `s3://bucket/key`."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).read_bytes()
    if uri.startswith("s3://"):
        bucket, key = _s3_split(uri)
        return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()
    raise ValueError(f"unsupported storage URI {uri!r}")


def write_bytes(uri: str, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Store one object (a dataset file) at `uri`, replacing it; a reader sees the old or the new one whole
    (`file://`: written beside it, then renamed; `s3://`: one PUT)."""
    if uri.startswith("file://"):
        dest = Path(uri.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
        return
    if uri.startswith("s3://"):
        bucket, key = _s3_split(uri)
        if not key:
            raise ValueError(f"storage URI {uri!r} names no object")
        _s3(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
        return
    raise ValueError(f"unsupported storage URI {uri!r}")
