"""Pushing a model directory or a dataset into the organization's registry, resumably.

The server's protocol (api/views/registry.py): declare the files (path, size, sha256), send each file in
chunks at the offset the server expects, complete. A chunk that fails in transit (connection lost, timeout,
a 5xx) is retried from what the server says arrived (`GET /org/uploads/{id}`), so nothing is sent twice and
an interrupted push goes on with `upload_id` where it stopped.

Where the server's store is S3 (the upload says `multipart`), a file of DIRECT_MIN_BYTES or more goes straight
to the store instead: the server hands out a presigned link per part, the parts are PUT there (without the
API token: the link carries its own signature) and their ETags reported back; the server checks the size,
and the sha256 from the stored bytes when the upload completes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from opentinker.errors import ApiConnectionError, NotFound, OpenTinkerError

RETRIES = 5
# Completing assembles, hashes and checks every file, then publishes them: minutes for a model of tens of GB,
# far past the client's usual 30 s per request.
COMPLETE_TIMEOUT_S = 3600.0
# Files this big go straight to an S3 store in parts when the server offers it (smaller ones: a chunk or two).
DIRECT_MIN_BYTES = 16 * 1024 * 1024
PART_TIMEOUT_S = 600.0  # one part is up to 64 MiB (more for huge files)
# Not part of a model or dataset: left out of a push (editor and OS droppings, git).
SKIPPED = (".git", ".DS_Store", "__pycache__")


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, with '/'
    local: Path
    size: int
    sha256: str


def scan(directory: str | os.PathLike[str]) -> list[LocalFile]:
    """The files to push: a directory's files (two levels at most, as the server takes), or one file."""
    root = Path(directory)
    if root.is_file():
        items = [(root.name, root)]
    elif root.is_dir():
        items = sorted(
            (p.relative_to(root).as_posix(), p)
            for p in root.rglob("*")
            if p.is_file()
            and not any(part in SKIPPED or part.startswith(".") for part in p.relative_to(root).parts)
        )
    else:
        raise OpenTinkerError(f"{directory}: no such file or directory", code="usage")
    out = []
    for rel, p in items:
        h = hashlib.sha256()
        with p.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        out.append(LocalFile(rel, p, p.stat().st_size, h.hexdigest()))
    if not out:
        raise OpenTinkerError(f"{directory}: nothing to push", code="usage")
    return out


class RegistryAPI:
    """``client.registry``: push and list the organization's models and datasets."""

    def __init__(self, client: Any) -> None:
        # The Client that owns it (typed loosely: its module imports this one).
        self._c = client

    def models(self) -> list[dict[str, Any]]:
        return list(self._c._call("GET", "/org/models"))

    def model(self, name: str) -> dict[str, Any]:
        return dict(self._c._call("GET", f"/org/models/{name}"))

    def datasets(self) -> list[dict[str, Any]]:
        return list(self._c._call("GET", "/org/datasets"))

    def dataset(self, name: str) -> dict[str, Any]:
        return dict(self._c._call("GET", f"/org/datasets/{name}"))

    def promote(
        self, job_id: str, name: str, *, step: int | None = None, description: str = ""
    ) -> dict[str, Any]:
        """Copy a job's checkpoint (``step``, default the latest) into the registry as ``name``'s next
        version, server side; returns the server's answer (``ref``, and the version with its ``status``)."""
        body: dict[str, Any] = {"name": name, "description": description}
        if step is not None:
            body["step"] = step
        request = self._c._http.build_request(
            "POST",
            f"/jobs/{job_id}/promote",
            json=body,
            timeout=httpx.Timeout(30.0, read=COMPLETE_TIMEOUT_S),  # copies, checks, may validate inline
        )
        try:
            response = self._c._http.send(request)
        except httpx.TransportError as exc:
            raise self._c._connection_error("POST", request, exc) from None
        return dict(self._c._checked(response).json())

    def push(
        self,
        kind: str,
        name: str,
        directory: str | os.PathLike[str],
        *,
        description: str = "",
        upload_id: str | None = None,
        on_file: Callable[[str, int], object] | None = None,
        on_bytes: Callable[[int], object] | None = None,
        on_file_done: Callable[[str, int], object] | None = None,
    ) -> dict[str, Any]:
        """Upload ``directory`` (a model directory, or a dataset file or directory) as the next version of
        ``name``; returns the server's answer (``ref``, and the version). ``upload_id`` resumes an upload."""
        files = scan(directory)
        if upload_id is None:
            body = {
                "kind": kind,
                "name": name,
                "description": description,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            }
            upload = self._c._call("POST", "/org/uploads", json=body)
        else:
            try:
                upload = self._c._call("GET", f"/org/uploads/{upload_id}")
            except NotFound:
                # Gone: completed (perhaps after the client stopped waiting), refused or aborted.
                return self._stored_version(kind, name, files, upload_id)
        uid, chunk = upload["id"], int(upload["chunk_max_bytes"])
        by_path = {f.path: f for f in files}
        for index, entry in enumerate(upload["files"]):
            local = by_path.get(entry["path"])
            if local is None or local.sha256 != entry["sha256"]:
                raise OpenTinkerError(f"{entry['path']} changed since the upload began", code="conflict")
            if on_file is not None:
                on_file(local.path, local.size)
            offset = int(entry["received"])
            if on_bytes is not None and offset:
                on_bytes(offset)
            direct = bool(upload.get("multipart")) and offset == 0 < local.size
            if direct and (entry.get("direct") or local.size >= DIRECT_MIN_BYTES):
                self._send_direct(uid, index, local, on_bytes)
                offset = local.size
            failures = 0
            with local.local.open("rb") as fh:
                while offset < local.size:
                    fh.seek(offset)
                    data = fh.read(chunk)
                    try:
                        self._put_chunk(uid, index, offset, data)
                    except (ApiConnectionError, _Retry) as e:
                        failures += 1
                        if failures > RETRIES:
                            raise OpenTinkerError(
                                f"{local.path}: upload keeps failing ({e}); resume with --resume {uid}",
                                code="connection_error",
                            ) from None
                        now = self._c._call("GET", f"/org/uploads/{uid}")["files"][index]["received"]
                        if on_bytes is not None and now != offset:
                            on_bytes(int(now) - offset)
                        offset = int(now)
                        continue
                    offset += len(data)
                    if on_bytes is not None:
                        on_bytes(len(data))
            if on_file_done is not None:
                on_file_done(local.path, local.size)
        return self._complete(kind, name, files, uid)

    def _send_direct(
        self, uid: str, index: int, local: LocalFile, on_bytes: Callable[[int], object] | None
    ) -> None:
        """Send one file straight to the store: a presigned link per part, then the parts' ETags."""
        base = f"/org/uploads/{uid}/files/{index}/multipart"
        links = self._c._call("POST", base)
        step, parts = int(links["part_bytes"]), []
        timeout = httpx.Timeout(30.0, write=PART_TIMEOUT_S, read=PART_TIMEOUT_S)
        with httpx.Client(timeout=timeout) as s3, local.local.open("rb") as fh:
            for part in links["parts"]:
                number = int(part["number"])
                fh.seek((number - 1) * step)
                data = fh.read(step)
                for attempt in range(RETRIES + 1):
                    try:
                        response = s3.put(str(part["url"]), content=data)
                    except httpx.TransportError as exc:
                        error: str = str(exc)
                    else:
                        if response.status_code == 200 and response.headers.get("ETag"):
                            break
                        error = f"HTTP {response.status_code} from the store"
                        if response.status_code == 403:  # the links expired: fresh ones, same upload
                            links = self._c._call("POST", base)
                            part = links["parts"][number - 1]
                    if attempt == RETRIES:
                        raise OpenTinkerError(
                            f"{local.path}: part {number} keeps failing ({error}); resume with "
                            f"--resume {uid}",
                            code="connection_error",
                        )
                parts.append({"number": number, "etag": response.headers["ETag"]})
                if on_bytes is not None:
                    on_bytes(len(data))
        self._c._call("POST", f"{base}/complete", json={"parts": parts})

    def _complete(self, kind: str, name: str, files: list[LocalFile], uid: str) -> dict[str, Any]:
        request = self._c._http.build_request(
            "POST", f"/org/uploads/{uid}/complete", timeout=httpx.Timeout(30.0, read=COMPLETE_TIMEOUT_S)
        )
        try:
            response = self._c._http.send(request)
        except httpx.TransportError as exc:
            error = self._c._connection_error("POST", request, exc)
            raise ApiConnectionError(
                f"{error}; `--resume {uid}` finds out whether the version was stored", code=error.code
            ) from None
        try:
            return dict(self._c._checked(response).json())
        except NotFound:
            # A repeat of a completion that already ran (the upload is gone): the version, if stored.
            return self._stored_version(kind, name, files, uid)

    def _stored_version(self, kind: str, name: str, files: list[LocalFile], uid: str) -> dict[str, Any]:
        """The newest version of `name` holding exactly these files (path and sha256), as `complete` answers
        it; an error saying so when there is none (the upload was refused or aborted)."""
        wanted = sorted((f.path, f.sha256) for f in files)
        try:
            entry = self._c._call("GET", f"/org/{kind}s/{name}")
        except NotFound:
            entry = {"versions": []}
        for version in sorted(entry["versions"], key=lambda v: -int(v["version"])):
            if sorted((f["path"], f["sha256"]) for f in version["files"]) == wanted:
                return {"kind": kind, "ref": version["ref"], "model": None, "dataset": None, kind: version}
        raise OpenTinkerError(
            f"upload {uid} is gone and no version of {name} holds these files: it was refused or aborted; "
            "push again without --resume",
            code="not_found",
        )

    def _put_chunk(self, uid: str, index: int, offset: int, data: bytes) -> None:
        request = self._c._http.build_request(
            "PUT",
            f"/org/uploads/{uid}/files/{index}",
            params={"offset": offset},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        try:
            response = self._c._http.send(request)
        except httpx.TransportError as exc:
            raise self._c._connection_error("PUT", request, exc) from None
        if response.status_code >= 500 or response.status_code == 409:
            raise _Retry(f"HTTP {response.status_code}")  # ask where to go on, then retry
        self._c._checked(response)


class _Retry(Exception):
    pass
