"""Object storage: `file://` directories and `s3://` buckets, the one place that branches on the scheme.

Used by the runtime (checkpoints, models, datasets), the platform (download links, an organization's prefix)
and the registry (package archives), each through a thin module of its own that knows its settings.

- Writes are whole or nothing for a reader: one object is written beside its target and renamed
  (`file://`) or sent in one PUT (`s3://`); a directory is published with its marker file (`meta.json`)
  last, so a listing counts only complete ones.
- `root`, where set, is the store's base: a `file://` path that resolves outside it (`..`, a symlink) is
  refused before anything is read, written or deleted. Names joined onto a prefix with `child` may not climb
  out of it.
- boto3 is imported only when an `s3://` URI is used: the SDK's own dependencies stay pydantic and httpx, and
  a program that never touches S3 never needs it (the platform and the runtime install it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

MARKER = "meta.json"  # what makes a published directory complete


class UnsupportedURI(ValueError):
    """A URI that is neither `file://` nor `s3://`."""


class OutsideStore(ValueError):
    """A path or name that would leave its prefix or the store."""


def scheme(uri: str) -> str:
    """`file` or `s3`; anything else is refused."""
    for name in ("file", "s3"):
        if uri.startswith(f"{name}://"):
            return name
    raise UnsupportedURI(f"unsupported storage URI {uri!r}")


def normalize(uri: str) -> str:
    """`scheme://netloc/path` with `.`, `..` and doubled slashes resolved, and no trailing slash."""
    parsed = urlparse(uri)
    path = posixpath.normpath("/" + parsed.path.lstrip("/")) if parsed.path else "/"
    return f"{parsed.scheme}://{parsed.netloc}{path.rstrip('/')}"


def is_under(uri: str, prefix: str) -> bool:
    """Whether `uri` lies inside `prefix`, by whole path segments (`store-other/` is not in `store/`). A URI
    with a query, fragment or parameters is not: `normalize` drops them, but a path read from the raw string
    would not (`x?/../../other`)."""
    if any(c in uri for c in "?#;"):
        return False
    return normalize(uri).startswith(normalize(prefix) + "/")


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


def child(prefix: str, name: str) -> str:
    """`prefix/name` for a relative `name` that stays below `prefix` (no absolute path, no `..`)."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise OutsideStore(f"{name!r} is not a name inside {prefix}")
    return join(prefix, str(rel))


def bucket_key(uri: str) -> tuple[str, str]:
    """(bucket, key) of an `s3://bucket/key` URI, the key without a trailing slash."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/")


def file_path(uri: str, *, root: str | None = None) -> Path:
    """The local path of a `file://` URI; with `root`, resolved and refused unless it lies inside the root's
    directory (a `file://` root: an `s3://` store has no local files) and names that place without going
    through a link inside the store: a link left in one job's folder must not serve another tenant's files."""
    if scheme(uri) != "file":
        raise UnsupportedURI(f"{uri!r} is not a file:// URI")
    path = Path(uri.removeprefix("file://"))
    if root is None:
        return path
    if scheme(root) != "file":
        raise OutsideStore(f"{uri} is outside the object store")
    root_path = Path(os.path.normpath(root.removeprefix("file://")))
    root_resolved, resolved = root_path.resolve(), path.resolve()
    lexical = Path(os.path.normpath(path))
    bases = [r for r in (root_path, root_resolved) if lexical.is_relative_to(r)]
    rel = lexical.relative_to(bases[0]) if bases else None
    if rel is None or root_resolved / rel != resolved:
        raise OutsideStore(f"{uri} is outside the object store")
    return resolved


def file_sha256(path: Path) -> str:
    """The hex sha256 of a local file, read in 1 MiB blocks (checkpoint files run to gigabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomically(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ObjectStore:
    """One store's way in: the S3 endpoint (None: AWS, or boto3's own `AWS_ENDPOINT_URL`) and, for a store
    that must keep to its base, `root` (see the module's docstring)."""

    endpoint_url: str | None = None
    root: str | None = None

    def s3(self) -> Any:
        import boto3  # lazy: only s3:// stores need it (a platform and runtime dependency, not the SDK's)

        return boto3.client("s3", endpoint_url=self.endpoint_url or None)

    def path(self, uri: str) -> Path:
        return file_path(uri, root=self.root)

    # One object.

    def put(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store `data` at `uri`, replacing what was there; a reader sees the old object or the new one."""
        if scheme(uri) == "file":
            _write_atomically(self.path(uri), data)
            return
        bucket, key = bucket_key(uri)
        if not key:
            raise UnsupportedURI(f"storage URI {uri!r} names no object")
        extra = {"ContentType": content_type} if content_type else {}
        self.s3().put_object(Bucket=bucket, Key=key, Body=data, **extra)

    def get(self, uri: str) -> bytes:
        if scheme(uri) == "file":
            return self.path(uri).read_bytes()
        bucket, key = bucket_key(uri)
        return bytes(self.s3().get_object(Bucket=bucket, Key=key)["Body"].read())

    def delete(self, uri: str) -> None:
        """Remove one object; one that is not there is not an error."""
        if scheme(uri) == "file":
            with contextlib.suppress(FileNotFoundError):
                self.path(uri).unlink()
            return
        bucket, key = bucket_key(uri)
        self.s3().delete_object(Bucket=bucket, Key=key)

    def download_file(self, uri: str, dest: Path) -> None:
        """Copy one object to the local file `dest` (its folder made), streaming; FileNotFoundError if the
        object is not there."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if scheme(uri) == "file":
            shutil.copyfile(self.path(uri), dest)
            return
        from botocore.exceptions import ClientError  # lazy, as boto3

        bucket, key = bucket_key(uri)
        try:
            self.s3().download_file(bucket, key, str(dest))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                raise FileNotFoundError(uri) from None
            raise

    def presigned_url(self, uri: str, *, expires: int) -> str:
        """A link that downloads one `s3://` object for `expires` seconds, without credentials."""
        bucket, key = bucket_key(uri)
        return str(
            self.s3().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
            )
        )

    def size(self, uri: str) -> int:
        """The size in bytes of one object; FileNotFoundError if it is not there."""
        if scheme(uri) == "file":
            return self.path(uri).stat().st_size
        from botocore.exceptions import ClientError  # lazy, as boto3

        bucket, key = bucket_key(uri)
        try:
            return int(self.s3().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(uri) from None
            raise

    # S3 multipart uploads: a client sends the parts of one big object straight to the store with presigned
    # links, and the server, which holds the credentials, starts, completes or aborts it.

    def multipart_create(self, uri: str) -> str:
        """Start a multipart upload of the `s3://` object `uri`; its upload id."""
        bucket, key = self._s3_only(uri)
        return str(self.s3().create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])

    def multipart_part_url(
        self, uri: str, upload_id: str, number: int, *, expires: int, size: int | None = None
    ) -> str:
        """A link that PUTs part `number` (1-based) of the multipart upload, without credentials; with `size`
        the part's length is signed (SigV4 signs the Content-Length header), so the store takes a part of
        exactly that many bytes and nothing bigger."""
        import boto3  # lazy, as in s3()
        from botocore.config import Config

        bucket, key = self._s3_only(uri)
        params: dict[str, Any] = {"Bucket": bucket, "Key": key, "UploadId": upload_id, "PartNumber": number}
        client = self.s3()
        if size is not None:
            params["ContentLength"] = size
            config = Config(signature_version="s3v4")  # a SigV2 link signs no length
            client = boto3.client("s3", endpoint_url=self.endpoint_url or None, config=config)
        return str(client.generate_presigned_url("upload_part", Params=params, ExpiresIn=expires))

    def multipart_complete(self, uri: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Put the parts (number, ETag) together into the object."""
        bucket, key = self._s3_only(uri)
        self.s3().complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]},
        )

    def multipart_abort(self, uri: str, upload_id: str) -> None:
        """Drop a multipart upload and the parts it holds; one that is gone is not an error."""
        from botocore.exceptions import ClientError  # lazy, as boto3

        bucket, key = self._s3_only(uri)
        with contextlib.suppress(ClientError):
            self.s3().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    @staticmethod
    def _s3_only(uri: str) -> tuple[str, str]:
        if scheme(uri) != "s3":
            raise UnsupportedURI(f"{uri!r}: multipart uploads are for s3:// stores")
        bucket, key = bucket_key(uri)
        if not key:
            raise UnsupportedURI(f"storage URI {uri!r} names no object")
        return bucket, key

    # Directories (checkpoints, models).

    def publish_dir(self, local: Path, uri: str, *, marker: str = MARKER) -> None:
        """Make the finished directory `local` visible at `uri`, replacing what was there; `local` is gone
        afterwards. `file://`: staged beside the destination (a hidden name), then swapped in by two renames,
        so a crash never leaves a half-copied directory under the real name and the old one is removed only
        once the new one is in place. `s3://`: the old marker is deleted first (readers stop taking the
        directory as complete), the files uploaded, the old files the new directory lacks deleted, and the
        marker uploaded last."""
        if scheme(uri) == "file":
            dest = self.path(uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tag = uuid.uuid4().hex[:12]
            incoming, old = (
                dest.with_name(f".{dest.name}.in-{tag}"),
                dest.with_name(f".{dest.name}.old-{tag}"),
            )
            shutil.move(str(local), incoming)  # may copy (another file system): under the hidden name
            if dest.exists():
                os.rename(dest, old)
            os.rename(incoming, dest)
            shutil.rmtree(old, ignore_errors=True)
            return
        bucket, key = bucket_key(uri)
        client = self.s3()
        before = {rel for _key, rel in self._s3_objects(client, uri)}
        if marker in before:
            client.delete_object(Bucket=bucket, Key=f"{key}/{marker}")
        files = sorted(p for p in local.rglob("*") if p.is_file())
        names = {str(p.relative_to(local)) for p in files}
        for p in files:
            if p.name != marker:
                client.upload_file(str(p), bucket, f"{key}/{p.relative_to(local)}")
        for rel in sorted(before - names - {marker}):
            client.delete_object(Bucket=bucket, Key=f"{key}/{rel}")
        for p in files:  # the marker goes last
            if p.name == marker:
                client.upload_file(str(p), bucket, f"{key}/{p.relative_to(local)}")
        shutil.rmtree(local)

    def list_dirs(self, prefix: str, *, marker: str = MARKER) -> list[str]:
        """Names of the complete directories (those with `marker`) directly under `prefix`, sorted."""
        if scheme(prefix) == "file":
            root = self.path(prefix)
            if not root.is_dir():
                return []
            # Hidden names are directories being swapped in or out by publish_dir.
            return sorted(
                p.name for p in root.iterdir() if not p.name.startswith(".") and (p / marker).is_file()
            )
        names = set()
        for _key, rel in self._s3_objects(self.s3(), prefix):
            if rel.count("/") == 1 and rel.endswith(f"/{marker}"):
                names.add(rel.split("/")[0])
        return sorted(names)

    def remove_dir(self, uri: str) -> None:
        """Remove a directory and everything in it; one that is not there is not an error."""
        if scheme(uri) == "file":
            shutil.rmtree(self.path(uri), ignore_errors=True)
            return
        bucket, _ = bucket_key(uri)
        client = self.s3()
        for key, _rel in self._s3_objects(client, uri):
            client.delete_object(Bucket=bucket, Key=key)

    def download_dir(self, uri: str) -> Path:
        """A local directory with the contents at `uri`: the path itself for `file://`, else a new temporary
        directory (the caller's to remove)."""
        if scheme(uri) == "file":
            return self.path(uri)
        bucket, _ = bucket_key(uri)
        client = self.s3()
        dest = Path(tempfile.mkdtemp(prefix="otk-"))
        for key, rel in self._s3_objects(client, uri):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
        return dest

    @staticmethod
    def _s3_objects(client: Any, prefix: str) -> list[tuple[str, str]]:
        """(key, key relative to `prefix`) of every object below an `s3://` prefix."""
        bucket, key = bucket_key(prefix)
        found: list[tuple[str, str]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
            found.extend((obj["Key"], obj["Key"][len(key) + 1 :]) for obj in page.get("Contents", []))
        return found
