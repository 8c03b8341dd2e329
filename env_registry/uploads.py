"""Resumable chunked uploads into an organization's model and dataset registries.

`upload_start` takes the file list (path, size, sha256) and refuses a bad one before any byte arrives (names,
kinds of file, sizes against the organization's REGISTRY_MAX_BYTES). `upload_chunk` appends one chunk at the
offset the server expects: a client that lost its connection asks `upload_get` how much of each file arrived
and goes on from there. Each chunk is one object under `<org prefix>/uploads/<id>/`. `upload_assemble` puts
the files together in a local directory, checking every size and sha256; the registry that completes the
upload (models, datasets) checks the contents and stores a version. A refusal at any point deletes the upload
row and its chunks: nothing of it stays.

Where the object store is S3, a file may instead go straight to the store (`upload_multipart_start`): the
server starts an S3 multipart upload of the file's object and hands the client presigned `upload_part` links,
the client PUTs the parts and reports their ETags (`upload_multipart_complete`), and the server completes it
and checks the object's size. The client's sha256 is never taken on its word: `upload_assemble` reads every
file back from the store, direct ones included, and refuses one whose bytes hash otherwise. Discarding an
upload (abort, refusal, abandonment) aborts its multipart uploads, so no parts stay behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from hashlib import sha256
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from env_registry.model_files import MAX_FILES, DeclaredFile
from env_registry.models import DatasetVersion, ModelVersion, Upload
from env_registry.selectors import NAME_RE
from portal import storage
from portal.errors import Conflict, DomainError, NotFound, QuotaExceeded
from portal.models import Organization

CHUNK_MAX_BYTES = 8 * 1024 * 1024  # one request's body; the client splits bigger files
# Every chunk but a file's last is at least this (or CHUNK_MAX_BYTES where that is lower): each chunk is one
# stored object and one request, so a client sending bytes one at a time cannot make millions of them.
CHUNK_MIN_BYTES = 1024 * 1024
# Open uploads per organization: each holds a row and stored chunks until completed, aborted or abandoned
# (ABANDONED_AFTER); REGISTRY_MAX_BYTES caps their bytes, this their number (empty files weigh nothing).
MAX_OPEN_UPLOADS = 16
# An upload nobody sent a chunk to for this long is abandoned: dropped (row and chunks) when its organization
# starts another, so it stops counting against REGISTRY_MAX_BYTES.
ABANDONED_AFTER = timedelta(hours=24)
SHA256_RE = r"^[0-9a-f]{64}$"
# Direct (S3 multipart) uploads: parts of at least MULTIPART_PART_BYTES (S3 takes 5 MiB to 5 GiB, the last
# part smaller), at most MULTIPART_MAX_PARTS of them (bigger files get bigger parts), so one answer carries at
# most that many links.
MULTIPART_PART_BYTES = 64 * 1024 * 1024
MULTIPART_MAX_PART_BYTES = 5 * 1024**3
MULTIPART_MAX_PARTS = 1000
SIGV4_MAX_EXPIRES = 7 * 24 * 3600  # S3 refuses a SigV4 link that lives longer (the part links are SigV4)


def _chunks_prefix(upload: Upload) -> str:
    return storage.file_uri(storage.organization_prefix(upload.organization.slug), f"uploads/{upload.id}")


def registry_bytes_used(organization: Organization, *, excluding: Upload | None = None) -> int:
    """What the organization's models, datasets and open uploads take (against REGISTRY_MAX_BYTES)."""
    models = ModelVersion.objects.filter(model__organization=organization).aggregate(n=Sum("size_bytes"))["n"]
    datasets = DatasetVersion.objects.filter(dataset__organization=organization).aggregate(
        n=Sum("size_bytes")
    )["n"]
    open_uploads = Upload.objects.filter(organization=organization)
    if excluding is not None:
        open_uploads = open_uploads.exclude(pk=excluding.pk)
    pending = open_uploads.aggregate(n=Sum("size_bytes"))["n"]
    return int(models or 0) + int(datasets or 0) + int(pending or 0)


def declared_files(raw: list[dict[str, Any]]) -> list[DeclaredFile]:
    import re

    if not isinstance(raw, list) or not raw:
        raise DomainError("files: list each file with its path, size and sha256", field="files")
    if len(raw) > MAX_FILES:
        raise DomainError(f"at most {MAX_FILES} files in one upload", field="files")
    out = []
    for i, f in enumerate(raw):
        path, size, digest = f.get("path"), f.get("size"), f.get("sha256")
        if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DomainError(f"files[{i}]: path (text) and size (bytes, >= 0) are required", field="files")
        if not isinstance(digest, str) or not re.match(SHA256_RE, digest):
            raise DomainError(f"files[{i}]: sha256 must be 64 lowercase hex digits", field="files")
        if any(d.path == path for d in out):
            raise DomainError(f"files[{i}]: {path!r} is listed twice", field="files")
        out.append(DeclaredFile(path=path, size=size, sha256=digest))
    return out


def upload_start(
    *,
    organization: Organization,
    user,
    kind: str,
    name: str,
    files: list[DeclaredFile],
    description: str = "",
) -> Upload:
    """Open an upload after checking what it will hold; the caller checked the kinds of file."""
    if not NAME_RE.match(name or ""):
        raise DomainError("name is 1-64 lowercase letters, digits, '-' or '_'", field="name")
    total = sum(f.size for f in files)
    stale = Upload.objects.filter(organization=organization, updated_at__lt=timezone.now() - ABANDONED_AFTER)
    for old in stale.select_related("organization"):
        upload_discard(old)
    with transaction.atomic():
        # One organization's uploads start one at a time, so two cannot both take the last free bytes.
        Organization.objects.select_for_update().get(pk=organization.pk)
        open_now = Upload.objects.filter(organization=organization).count()
        if open_now >= MAX_OPEN_UPLOADS:
            raise QuotaExceeded(
                f"your organization has {open_now} uploads open (at most {MAX_OPEN_UPLOADS}): complete or "
                "abort some first",
                field="files",
            )
        limit = settings.REGISTRY_MAX_BYTES
        used = registry_bytes_used(organization)
        if used + total > limit:
            raise DomainError(
                f"the upload is {total} bytes; your organization's models and datasets may take {limit} "
                f"bytes and {used} are in use (REGISTRY_MAX_BYTES)",
                field="files",
            )
        return Upload.objects.create(
            id=uuid.uuid4(),
            organization=organization,
            user=user,
            kind=kind,
            name=name,
            description=description[:500],
            files=[{"path": f.path, "size": f.size, "sha256": f.sha256, "received": 0} for f in files],
            size_bytes=total,
        )


def upload_get(organization: Organization, upload_id: str) -> Upload:
    try:
        key = uuid.UUID(str(upload_id))
    except ValueError:
        raise NotFound("no such upload") from None
    upload = Upload.objects.select_related("organization").filter(pk=key, organization=organization).first()
    if upload is None:
        raise NotFound("no such upload")
    return upload


def upload_chunk(upload: Upload, *, index: int, offset: int, data: bytes) -> Upload:
    """Append `data` to file `index` at `offset`, which must be what arrived of it so far (409 otherwise,
    saying where to go on)."""
    with transaction.atomic():
        locked = Upload.objects.select_for_update().select_related("organization").get(pk=upload.pk)
        if not 0 <= index < len(locked.files):
            raise NotFound(f"the upload has no file {index}")
        entry = locked.files[index]
        if entry.get("multipart") or entry.get("direct"):
            raise Conflict(f"{entry['path']} is sent straight to the store (multipart)", field="index")
        if offset != entry["received"]:
            raise Conflict(
                f"{entry['path']}: {entry['received']} bytes arrived so far; "
                f"send from offset {entry['received']}",
                field="offset",
            )
        if offset + len(data) > entry["size"]:
            raise DomainError(
                f"{entry['path']} was declared as {entry['size']} bytes; this chunk would make it "
                f"{offset + len(data)}",
                field="offset",
            )
        if not data:
            raise DomainError("an empty chunk", field="body")
        floor, left = min(CHUNK_MIN_BYTES, CHUNK_MAX_BYTES), entry["size"] - offset
        if len(data) < min(floor, left):
            raise DomainError(
                f"{entry['path']}: a chunk is at least {floor} bytes unless it ends the file ({left} bytes "
                f"are left); this one is {len(data)}",
                field="body",
            )
        uri = storage.file_uri(_chunks_prefix(locked), f"{index}/{offset:015d}")
        storage.store().put(uri, data)
        entry["received"] = offset + len(data)
        locked.save(update_fields=["files", "updated_at"])
        return locked


def multipart_offered() -> bool:
    """Whether files may go straight to the store: an S3 store, where presigned part links exist."""
    return storage.normalize(settings.OBJECT_STORE_URL).startswith("s3://")


def _direct_uri(upload: Upload, index: int) -> str:
    return storage.file_uri(_chunks_prefix(upload), f"{index}/direct")


def multipart_part_bytes(size: int) -> int:
    return max(MULTIPART_PART_BYTES, -(-size // MULTIPART_MAX_PARTS))


def upload_multipart_start(upload: Upload, *, index: int) -> dict[str, Any]:
    """Start (or, asked again, go on with) sending file `index` straight to the store: the part size and a
    presigned link for each part. Only for a file none of whose bytes came through the API."""
    if not multipart_offered():
        raise DomainError(
            "the object store is not S3: send the file in chunks through the API", field="index"
        )
    with transaction.atomic():
        locked = Upload.objects.select_for_update().select_related("organization").get(pk=upload.pk)
        if not 0 <= index < len(locked.files):
            raise NotFound(f"the upload has no file {index}")
        entry = locked.files[index]
        if entry.get("direct"):
            raise Conflict(f"{entry['path']} arrived already", field="index")
        if entry["received"]:
            raise Conflict(
                f"{entry['path']}: {entry['received']} bytes arrived through the API; send the rest there",
                field="index",
            )
        if entry["size"] == 0:
            raise DomainError(f"{entry['path']} is empty: there is nothing to send", field="index")
        part_bytes = multipart_part_bytes(entry["size"])
        if part_bytes > MULTIPART_MAX_PART_BYTES:
            raise DomainError(f"{entry['path']} is too big for a multipart upload", field="index")
        uri = _direct_uri(locked, index)
        if not entry.get("multipart"):
            entry["multipart"] = {"id": storage.store().multipart_create(uri), "part_bytes": part_bytes}
            locked.save(update_fields=["files", "updated_at"])
        multipart = entry["multipart"]
    step = multipart["part_bytes"]
    count = -(-entry["size"] // step)
    expires = min(int(settings.OBJECT_STORE_LINK_SECONDS), SIGV4_MAX_EXPIRES)
    store = storage.store()
    # each link takes exactly its part's bytes (the last part the rest): the parts in flight never hold more
    # than the declared size counted against REGISTRY_MAX_BYTES
    return {
        "part_bytes": step,
        "expires_in": expires,
        "parts": [
            {
                "number": n,
                "url": store.multipart_part_url(
                    uri, multipart["id"], n, expires=expires, size=min(step, entry["size"] - (n - 1) * step)
                ),
            }
            for n in range(1, count + 1)
        ],
    }


def upload_multipart_complete(upload: Upload, *, index: int, etags: list[tuple[int, str]]) -> Upload:
    """Put file `index`'s parts together (numbers 1..N with the ETags the store answered) and check the
    object's size; a wrong size drops the object and the file starts over. Its sha256 is checked when the
    upload completes (upload_assemble reads it back)."""
    from botocore.exceptions import ClientError  # lazy, as boto3: only S3 stores come here

    with transaction.atomic():
        locked = Upload.objects.select_for_update().select_related("organization").get(pk=upload.pk)
        if not 0 <= index < len(locked.files):
            raise NotFound(f"the upload has no file {index}")
        entry = locked.files[index]
        multipart = entry.get("multipart")
        if entry.get("direct"):  # a repeat of a completion that ran (its answer was lost)
            return locked
        if not multipart:
            raise Conflict(f"{entry['path']}: no multipart upload is in progress for it", field="index")
        count = -(-entry["size"] // multipart["part_bytes"])
        if sorted(n for n, _ in etags) != list(range(1, count + 1)):
            raise DomainError(
                f"{entry['path']} is sent in {count} parts: list each part number 1..{count} once with its "
                "ETag",
                field="parts",
            )
        uri, store = _direct_uri(locked, index), storage.store()
        try:
            store.multipart_complete(uri, multipart["id"], sorted(etags))
        except ClientError as e:  # the store's refusal (a wrong ETag, a part too small, a missing part)
            raise DomainError(f"{entry['path']}: the store refused the parts ({e})", field="parts") from None
        entry.pop("multipart")
        size = store.size(uri)
        if size == entry["size"]:
            entry["received"], entry["direct"] = size, True
        else:
            store.delete(uri)  # and without its multipart, the file starts over
        locked.save(update_fields=["files", "updated_at"])
    if size != entry["size"]:
        raise DomainError(
            f"{entry['path']} was declared as {entry['size']} bytes; the parts hold {size}", field="parts"
        )
    return locked


def upload_missing(upload: Upload) -> list[str]:
    return [f["path"] for f in upload.files if f["received"] != f["size"]]


def upload_check_arrived(upload: Upload) -> None:
    """Refuse to complete an upload that lacks bytes (it stays open: the client goes on with it)."""
    missing = upload_missing(upload)
    if missing:
        raise DomainError(f"not all bytes arrived yet: {', '.join(missing[:5])}", field="files")


def upload_assemble(upload: Upload) -> Path:
    """A new local directory with the upload's files, each size and sha256 checked (the caller removes it)."""
    upload_check_arrived(upload)
    root = Path(tempfile.mkdtemp(prefix="otk-upload-"))
    try:
        prefix = _chunks_prefix(upload)
        store = storage.store()
        for index, entry in enumerate(upload.files):
            target = root / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            h = sha256()
            if entry.get("direct"):  # one object in the store, read back here: its sha256 is ours
                store.download_file(_direct_uri(upload, index), target)
                with target.open("rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(block)
            else:
                with target.open("wb") as out:
                    offset = 0
                    while offset < entry["size"]:
                        data = store.get(storage.file_uri(prefix, f"{index}/{offset:015d}"))
                        h.update(data)
                        out.write(data)
                        offset += len(data)
            if h.hexdigest() != entry["sha256"]:
                raise DomainError(
                    f"{entry['path']}: the bytes received have sha256 {h.hexdigest()}, not the declared "
                    f"{entry['sha256']}",
                    field="files",
                )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


@contextlib.contextmanager
def upload_completing(upload: Upload) -> Iterator[None]:
    """Let one completion of an upload run at a time (a retried or doubled request must not store it twice):
    a PostgreSQL advisory lock on the upload's id, held for the completion; a second one meanwhile gets 409,
    one after it a 404 (the upload is gone, as a version or refused)."""
    key = int.from_bytes(upload.id.bytes[:8], "big", signed=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        (locked,) = cursor.fetchone()
    if not locked:
        raise Conflict("this upload is being completed by another request")
    try:
        if not Upload.objects.filter(pk=upload.pk).exists():
            raise NotFound("no such upload")
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


def upload_discard(upload: Upload) -> None:
    """Delete the upload's row and chunks (abort, refusal or completion), aborting its multipart uploads."""
    Upload.objects.filter(pk=upload.pk).delete()
    store = storage.store()
    for index, entry in enumerate(upload.files):
        if entry.get("multipart"):
            store.multipart_abort(_direct_uri(upload, index), entry["multipart"]["id"])
    store.remove_dir(_chunks_prefix(upload))
