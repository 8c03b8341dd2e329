"""Environment package archives: manifest validation, size-capped streaming, safe inspection and extraction.

A package is a `.tar.gz` holding `opentinker.json` (the manifest), the source, and optionally `README.md`.
Everything here is defensive: uploads are untrusted. Sizes are checked while streaming (an oversized upload is
refused without being written whole), members may not escape the package directory (`../`, absolute paths,
links, devices), and the unpacked total is capped so a small compressed archive cannot expand without bound.
It lives in the SDK (pydantic only) because both the registry (checking uploads) and the runtime (unpacking a
job's pinned package) need it, and the runtime may not import the registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_ARCHIVE_BYTES = 20 * 1024 * 1024
MAX_UNPACKED_BYTES = 100 * 1024 * 1024
MAX_MEMBERS = 2000
MANIFEST_NAME = "opentinker.json"
SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$")
ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


class ArchiveError(ValueError):
    """The upload is not an acceptable package; the message tells the publisher what to fix."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
    version: str
    entrypoint: str = Field(max_length=200)
    protocol: Literal["single-turn", "multi-turn", "tool-calling", "multi-agent"]
    roles: list[str] = Field(default_factory=lambda: ["agent"], min_length=1, max_length=16)
    description: str = Field("", max_length=500)
    tags: list[str] = Field(default_factory=list, max_length=16)
    license: str = Field("", max_length=64)

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER_RE.match(v):
            raise ValueError("version must be semver MAJOR.MINOR.PATCH[-PRERELEASE]")
        return v

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, v: str) -> str:
        if not ENTRYPOINT_RE.match(v):
            raise ValueError("entrypoint must be `module.path:ClassName`")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        if any(not re.match(r"^[a-z0-9-]{1,32}$", t) for t in v):
            raise ValueError("tags are 1-32 lowercase letters, digits or dashes")
        return v


def manifest_parse(raw: bytes | str | dict[str, Any]) -> Manifest:
    try:
        data = raw if isinstance(raw, dict) else json.loads(raw)
        return Manifest.model_validate(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{MANIFEST_NAME} is not valid JSON: {e}") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in e.errors()
        )
        raise ArchiveError(f"invalid manifest: {problems}") from None


def read_capped(chunks: Iterable[bytes], limit: int = MAX_ARCHIVE_BYTES) -> tuple[bytes, str]:
    """Read an upload stream, refusing it as soon as it passes `limit`; returns the bytes and their sha256."""
    digest, buf, size = hashlib.sha256(), io.BytesIO(), 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ArchiveError(f"archive is over the {limit // (1024 * 1024)} MB limit")
        digest.update(chunk)
        buf.write(chunk)
    return buf.getvalue(), digest.hexdigest()


@dataclass(frozen=True)
class Package:
    manifest: Manifest
    readme: str
    files: list[str]


def _check_member(m: tarfile.TarInfo) -> None:
    path = PurePosixPath(m.name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"archive member {m.name!r} points outside the package")
    if not (m.isfile() or m.isdir()):
        raise ArchiveError(f"archive member {m.name!r} is a link or special file; only files and directories")


def _members(data: bytes) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")  # noqa: SIM115 (in memory, returned)
        members, total = [], 0
        for m in tar:  # iterating decompresses lazily; stop early on a bomb
            _check_member(m)
            total += m.size
            members.append(m)
            if total > MAX_UNPACKED_BYTES:
                raise ArchiveError(f"archive unpacks to over {MAX_UNPACKED_BYTES // (1024 * 1024)} MB")
            if len(members) > MAX_MEMBERS:
                raise ArchiveError(f"archive has over {MAX_MEMBERS} files")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"not a readable .tar.gz archive: {e}") from None
    return tar, members


def inspect_archive(data: bytes) -> Package:
    tar, members = _members(data)
    by_name = {PurePosixPath(m.name).as_posix(): m for m in members if m.isfile()}
    if MANIFEST_NAME not in by_name:
        raise ArchiveError(f"archive has no {MANIFEST_NAME} at its top level")
    manifest = manifest_parse(tar.extractfile(by_name[MANIFEST_NAME]).read())  # type: ignore[union-attr]
    module = manifest.entrypoint.split(":")[0].replace(".", "/")
    if f"{module}.py" not in by_name and f"{module}/__init__.py" not in by_name:
        raise ArchiveError(f"entrypoint module {module.replace('/', '.')} is not in the archive")
    readme = ""
    if "README.md" in by_name:
        readme = tar.extractfile(by_name["README.md"]).read(64 * 1024).decode(errors="replace")  # type: ignore[union-attr]
    return Package(manifest, readme, sorted(by_name))


def extract_archive(data: bytes, dest: Path) -> None:
    """Unpack into `dest` after the same checks as `inspect_archive` (members are re-checked here)."""
    tar, members = _members(data)
    dest.mkdir(parents=True, exist_ok=True)
    tar.extractall(dest, members=members, filter="data")
