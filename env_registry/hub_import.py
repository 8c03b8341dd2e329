"""Importing a Hugging Face Hub repository into an organization's model registry, where the server can reach
the Hub and the repository is allow-listed (HUB_IMPORT_ALLOW: `owner/*` or exact `owner/name` patterns).

Only the kinds of file a registry model may hold are fetched (never pickle weights or code, whatever the
repository has), then the same checks as an upload run (env_registry/model_files.py) and the files are
stored as the model's next version, validated in the sandbox before use. A `MirrorFetcher` reads a local
directory laid out as `<root>/<owner>/<name>/` instead of the Hub: an air-gapped mirror, and the tests (this
project's machines cannot reach the Hub; only `MirrorFetcher` is exercised by tests).
`python manage.py registry_import_model ORG REPO --name NAME` runs it.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Protocol

from django.conf import settings

from env_registry.model_files import (
    SAFE_SUFFIXES,
    DeclaredFile,
    ModelFilesError,
    contents_check,
    files_check,
    is_adapter,
)
from env_registry.model_registry import model_validation_start, model_version_store
from env_registry.models import ModelVersion
from env_registry.selectors import NAME_RE
from env_registry.uploads import registry_bytes_used
from portal.errors import DomainError
from portal.models import Organization

REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
ALLOW_PATTERNS = [f"*{suffix}" for suffix in SAFE_SUFFIXES]


class Fetcher(Protocol):
    def fetch(self, repo_id: str, revision: str | None, dest: Path) -> None:
        """Put the repository's files matching ALLOW_PATTERNS under `dest`."""
        ...


class HubFetcher:
    """The Hugging Face Hub (or HF_ENDPOINT), through huggingface_hub; files outside ALLOW_PATTERNS are never
    downloaded."""

    def fetch(self, repo_id: str, revision: str | None, dest: Path) -> None:
        from huggingface_hub import snapshot_download  # lazy: only an import needs it

        snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, local_dir=str(dest))


class MirrorFetcher:
    """A local mirror: `<root>/<owner>/<name>/` holds the repository's files (revision: a subdirectory)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def fetch(self, repo_id: str, revision: str | None, dest: Path) -> None:
        src = self.root / repo_id / (revision or "")
        if not src.is_dir():
            raise DomainError(f"{repo_id} is not in the mirror", field="repo")
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            if (
                path.is_file()
                and not path.is_symlink()
                and any(fnmatch.fnmatch(rel, p) for p in ALLOW_PATTERNS)
            ):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest / rel)


def repo_allowed(repo_id: str) -> bool:
    return any(fnmatch.fnmatchcase(repo_id, pattern) for pattern in settings.HUB_IMPORT_ALLOW)


def model_import(
    *,
    organization: Organization,
    user,
    repo_id: str,
    name: str,
    revision: str | None = None,
    fetcher: Fetcher | None = None,
) -> ModelVersion:
    """Copy an allow-listed repository into the registry as `name`'s next version (pending validation)."""
    if not REPO_RE.match(repo_id) or ".." in repo_id:
        raise DomainError("repo is `owner/name` on the Hugging Face Hub", field="repo")
    if not NAME_RE.match(name or ""):
        raise DomainError("name is 1-64 lowercase letters, digits, '-' or '_'", field="name")
    if not repo_allowed(repo_id):
        raise DomainError(
            f"{repo_id} is not on this server's import allow-list (HUB_IMPORT_ALLOW)", field="repo"
        )
    root = Path(tempfile.mkdtemp(prefix="otk-hub-"))
    try:
        (fetcher or HubFetcher()).fetch(repo_id, revision, root)
        files = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(".") or "/." in rel:  # huggingface_hub's own bookkeeping (.cache/)
                continue
            files.append(DeclaredFile(rel, path.stat().st_size, sha256(path.read_bytes()).hexdigest()))
        if is_adapter(f.path for f in files):
            raise DomainError(f"{repo_id} is an adapter: push it with its base instead", field="repo")
        try:
            files_check(files)
            info = contents_check(root, files)
        except ModelFilesError as e:
            raise DomainError(f"{repo_id}: {e}", field="repo") from None
        total = sum(f.size for f in files)
        used = registry_bytes_used(organization)
        if used + total > settings.REGISTRY_MAX_BYTES:
            raise DomainError(
                f"{repo_id} is {total} bytes; your organization's models and datasets may take "
                f"{settings.REGISTRY_MAX_BYTES} bytes and {used} are in use (REGISTRY_MAX_BYTES)",
                field="repo",
            )
        staged = Path(tempfile.mkdtemp(prefix="otk-hub-stage-"))
        for f in files:  # only the checked files, without the fetcher's bookkeeping
            (staged / f.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / f.path, staged / f.path)
        version = model_version_store(
            organization=organization,
            user=user,
            name=name,
            description=f"imported from {repo_id}" + (f"@{revision}" if revision else ""),
            root=staged,
            files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            size_bytes=total,
            info={**info, "source": f"hf://{repo_id}" + (f"@{revision}" if revision else "")},
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    model_validation_start(version)
    return version
