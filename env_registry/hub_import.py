"""Importing a Hugging Face Hub repository into an organization's model registry, where the server can reach
the Hub and the repository is allow-listed (HUB_IMPORT_ALLOW: `owner/*` or exact `owner/name` patterns).

Only the kinds of file a registry model may hold are fetched (never pickle weights or code, whatever the
repository has), then the same checks as an upload run (env_registry/model_files.py) and the files are
stored as the model's next version, validated in the sandbox before use. A `MirrorFetcher` reads a local
directory laid out as `<root>/<owner>/<name>/` instead of the Hub: an air-gapped mirror, and the tests (this
project's machines cannot reach the Hub; only `MirrorFetcher` is exercised by tests).
`python manage.py registry_import_model ORG REPO --name NAME` runs it in the foreground.

Through the API (`POST /org/model-imports`, an organization admin) the request only checks the repository's
name against the allow-list and reserves the model's next version, `pending` with `info.import = "queued"`;
a Celery task (`env_registry.import_hub_model` -> `model_import_run`) fetches from HUB_ENDPOINT (the Hub, or
a `file://` mirror directory), checks, publishes the files into the reserved version and starts its
validation. A refused repository (pickle weights only, remote code, over REGISTRY_MAX_BYTES, ...) leaves the
version `invalid` with the reason and no file stored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import shutil
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from env_registry.model_files import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    DeclaredFile,
    ModelFilesError,
    contents_check,
    files_check,
    is_adapter,
)
from env_registry.model_registry import model_validation_start, model_version_store
from env_registry.models import ModelVersion, RegisteredModel, ValidationStatus
from env_registry.selectors import NAME_RE
from env_registry.uploads import registry_bytes_used
from portal import storage
from portal.errors import DomainError, QuotaExceeded
from portal.models import Organization
from portal.services.enqueue import enqueue

REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
ALLOW_PATTERNS = [f"*{suffix}" for suffix in SAFE_SUFFIXES]


class Fetcher(Protocol):
    def list_files(self, repo_id: str, revision: str | None) -> dict[str, int]:
        """Every file the repository holds, with its size in bytes (nothing downloaded)."""
        ...

    def fetch(self, repo_id: str, revision: str | None, dest: Path) -> None:
        """Put the repository's files matching ALLOW_PATTERNS under `dest`."""
        ...


class HubFetcher:
    """The Hugging Face Hub (or another endpoint serving its API), through huggingface_hub; files outside
    ALLOW_PATTERNS are never downloaded."""

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint

    def list_files(self, repo_id: str, revision: str | None) -> dict[str, int]:
        from huggingface_hub import HfApi  # lazy: only an import needs it
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
        from huggingface_hub.hf_api import RepoFile

        try:
            tree = HfApi(endpoint=self.endpoint).list_repo_tree(repo_id, revision=revision, recursive=True)
            return {f.path: int(f.size) for f in tree if isinstance(f, RepoFile)}
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            # The repository's answer, not the network's: a refusal, not a retry.
            raise DomainError(f"{repo_id}: {type(e).__name__} at {self.endpoint}", field="repo") from None

    def fetch(self, repo_id: str, revision: str | None, dest: Path) -> None:
        from huggingface_hub import snapshot_download  # lazy: only an import needs it

        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            local_dir=str(dest),
            endpoint=self.endpoint,
        )


class MirrorFetcher:
    """A local mirror: `<root>/<owner>/<name>/` holds the repository's files (revision: a subdirectory)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _src(self, repo_id: str, revision: str | None) -> Path:
        src = self.root / repo_id / (revision or "")
        # a revision naming a link the repository holds must not lead out of the repository's directory
        inside = src.resolve().is_relative_to((self.root / repo_id).resolve())
        if not src.is_dir() or not inside:
            raise DomainError(f"{repo_id} is not in the mirror", field="repo")
        return src

    def list_files(self, repo_id: str, revision: str | None) -> dict[str, int]:
        src = self._src(repo_id, revision)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        return {p.relative_to(src).as_posix(): p.stat().st_size for p in files}

    def fetch(self, repo_id: str, revision: str | None, dest: Path) -> None:
        src = self._src(repo_id, revision)
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


def configured_fetcher() -> Fetcher:
    """HUB_ENDPOINT's fetcher: a `file://` mirror directory, or the Hub's API at an http(s) URL."""
    endpoint = settings.HUB_ENDPOINT
    if endpoint.startswith("file://"):
        return MirrorFetcher(endpoint.removeprefix("file://"))
    return HubFetcher(endpoint)


def _request_check(repo_id: str, name: str, revision: str | None) -> None:
    if not isinstance(repo_id, str) or not REPO_RE.match(repo_id) or ".." in repo_id:
        raise DomainError("repo is `owner/name` on the Hugging Face Hub", field="repo")
    if not NAME_RE.match(name or ""):
        raise DomainError("name is 1-64 lowercase letters, digits, '-' or '_'", field="name")
    if revision is not None and (not REVISION_RE.match(revision) or ".." in revision):
        raise DomainError(
            "revision is a branch, tag or commit (letters, digits, '.', '_', '-', '/')", field="revision"
        )
    if not repo_allowed(repo_id):
        raise DomainError(
            f"{repo_id} is not on this server's import allow-list (HUB_IMPORT_ALLOW)", field="repo"
        )


def _source(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _quota_check(organization: Organization, repo_id: str, total: int) -> None:
    used = registry_bytes_used(organization)
    if used + total > settings.REGISTRY_MAX_BYTES:
        raise DomainError(
            f"{repo_id} is {total} bytes; your organization's models and datasets may take "
            f"{settings.REGISTRY_MAX_BYTES} bytes and {used} are in use (REGISTRY_MAX_BYTES)",
            field="repo",
        )


def _fetch_checked(
    organization: Organization, repo_id: str, revision: str | None, fetcher: Fetcher
) -> tuple[Path, list[DeclaredFile], dict]:
    """Fetch the repository's model files into a new local directory and check them as an upload; (the
    directory, its files, what the checks found), or DomainError saying why the repository is refused."""
    listed = fetcher.list_files(repo_id, revision)
    weights = [n for n in listed if n.lower().endswith(PICKLE_SUFFIXES)]
    if weights and not any(n.endswith(".safetensors") for n in listed):
        raise DomainError(
            f"{repo_id} has pickle weights only ({', '.join(weights[:3])}): unpickling runs code, so the "
            "registry takes safetensors only",
            field="repo",
        )
    # what would be fetched, weighed before any byte is: a repository over the quota never fills the disk
    listed_bytes = sum(
        size for n, size in listed.items() if any(fnmatch.fnmatch(n, p) for p in ALLOW_PATTERNS)
    )
    _quota_check(organization, repo_id, listed_bytes)
    root = Path(tempfile.mkdtemp(prefix="otk-hub-"))
    try:
        fetcher.fetch(repo_id, revision, root)
        files = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(".") or "/." in rel:  # huggingface_hub's own bookkeeping (.cache/)
                continue
            h = sha256()
            with path.open("rb") as fh:  # in blocks: a weights file may be many GB
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
            files.append(DeclaredFile(rel, path.stat().st_size, h.hexdigest()))
        if is_adapter(f.path for f in files):
            raise DomainError(f"{repo_id} is an adapter: push it with its base instead", field="repo")
        try:
            files_check(files)
            info = contents_check(root, files)
        except ModelFilesError as e:
            raise DomainError(f"{repo_id}: {e}", field="repo") from None
        _quota_check(organization, repo_id, sum(f.size for f in files))
        staged = Path(tempfile.mkdtemp(prefix="otk-hub-stage-"))
        for f in files:  # only the checked files, without the fetcher's bookkeeping
            (staged / f.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / f.path, staged / f.path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return staged, files, {**info, "source": f"hf://{_source(repo_id, revision)}"}


def model_import(
    *,
    organization: Organization,
    user,
    repo_id: str,
    name: str,
    revision: str | None = None,
    fetcher: Fetcher | None = None,
) -> ModelVersion:
    """Copy an allow-listed repository into the registry as `name`'s next version (pending validation), in
    the foreground (the management command); a refusal raises DomainError and stores nothing."""
    _request_check(repo_id, name, revision)
    staged, files, info = _fetch_checked(organization, repo_id, revision, fetcher or configured_fetcher())
    version = model_version_store(
        organization=organization,
        user=user,
        name=name,
        description=f"imported from {_source(repo_id, revision)}",
        root=staged,
        files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        size_bytes=sum(f.size for f in files),
        info=info,
    )
    model_validation_start(version)
    return version


# --- through the API: a reserved version, filled by a Celery task -----------------------------------------

IMPORT_QUEUED, IMPORT_FETCHING, IMPORT_DONE, IMPORT_REFUSED = "queued", "fetching", "done", "refused"
# Imports queued or running per organization: each is a pending version and a task that may fetch up to the
# organization's free bytes onto a worker's disk.
MAX_IMPORTS_IN_FLIGHT = 4


def model_import_request(
    *, organization: Organization, user, repo_id: str, name: str, revision: str | None = None
) -> ModelVersion:
    """Check the repository's name against the allow-list and reserve `name`'s next version (pending,
    `info.import` queued); the import itself runs in a Celery task once the transaction commits."""
    _request_check(repo_id, name, revision)
    used = registry_bytes_used(organization)
    if used >= settings.REGISTRY_MAX_BYTES:
        raise DomainError(
            f"your organization's models and datasets take {used} of their {settings.REGISTRY_MAX_BYTES} "
            "bytes (REGISTRY_MAX_BYTES): there is no room for an import",
            field="repo",
        )
    source = _source(repo_id, revision)
    with transaction.atomic():
        # an organization's requests one at a time, so two cannot both pass the cap on imports in flight
        Organization.objects.select_for_update().get(pk=organization.pk)
        in_flight = ModelVersion.objects.filter(
            model__organization=organization,
            status=ValidationStatus.PENDING,
            info__import__in=[IMPORT_QUEUED, IMPORT_FETCHING],
        ).count()
        if in_flight >= MAX_IMPORTS_IN_FLIGHT:
            raise QuotaExceeded(
                f"your organization has {in_flight} imports queued or running (at most "
                f"{MAX_IMPORTS_IN_FLIGHT}): wait for them to finish",
                field="repo",
            )
        model, _ = RegisteredModel.objects.get_or_create(
            organization=organization, name=name, defaults={"description": f"imported from {source}"}
        )
        model = RegisteredModel.objects.select_for_update().get(pk=model.pk)  # numbers one at a time
        number = (model.versions.aggregate(n=Max("version"))["n"] or 0) + 1
        version = ModelVersion.objects.create(
            model=model,
            version=number,
            uri=storage.file_uri(storage.organization_prefix(organization.slug), f"models/{name}/{number}"),
            files=[],
            size_bytes=0,
            info={"source": f"hf://{source}", "import": IMPORT_QUEUED, "repo": repo_id, "revision": revision},
            validation_error=f"importing {source}",
            uploaded_by=user,
        )
        enqueue("env_registry.import_hub_model", version.pk, expires=3600)
    return version


def _refused(version: ModelVersion, e: DomainError) -> ModelVersion:
    ModelVersion.objects.filter(pk=version.pk).update(
        status=ValidationStatus.INVALID,
        size_bytes=0,
        validation_error=str(e)[:2000],
        validated_at=timezone.now(),
        info={**version.info, "import": IMPORT_REFUSED},
    )
    version.refresh_from_db()
    return version


def model_import_run(version_id: int, *, fetcher: Fetcher | None = None) -> ModelVersion | None:
    """Fetch, check and store a reserved import (the Celery task); acts only on a queued one, so a task
    delivered twice imports once. A refusal makes the version `invalid` with the reason, storing no file; an
    error that is not the repository's (network, storage) puts it back in the queue and raises (the task
    retries)."""
    with transaction.atomic():
        version = (
            ModelVersion.objects.select_for_update()
            .select_related("model__organization")
            .filter(pk=version_id)
            .first()
        )
        if version is None or version.status != ValidationStatus.PENDING:
            return version
        if version.info.get("import") != IMPORT_QUEUED:
            return version
        version.info = {**version.info, "import": IMPORT_FETCHING}
        version.save(update_fields=["info"])
    organization = version.model.organization
    repo_id, revision = version.info["repo"], version.info.get("revision")
    try:
        staged, files, info = _fetch_checked(organization, repo_id, revision, fetcher or configured_fetcher())
    except DomainError as e:
        return _refused(version, e)
    except Exception as e:
        ModelVersion.objects.filter(pk=version.pk).update(
            validation_error=f"not imported yet: {type(e).__name__}: {e}"[:2000],
            info={**version.info, "import": IMPORT_QUEUED},
        )
        raise
    try:
        with transaction.atomic():
            # an organization's imports take their bytes one at a time (the version's size, counted by
            # registry_bytes_used from now on), so two running at once cannot both take the last free bytes
            Organization.objects.select_for_update().get(pk=organization.pk)
            _quota_check(organization, repo_id, sum(f.size for f in files))
            ModelVersion.objects.filter(pk=version.pk).update(size_bytes=sum(f.size for f in files))
    except DomainError as e:
        shutil.rmtree(staged, ignore_errors=True)
        return _refused(version, e)
    try:
        storage.store().publish_dir(staged, version.uri)
    except Exception as e:  # the store's failure: nothing of it stays, and the task's retry imports again
        with contextlib.suppress(Exception):
            storage.store().remove_dir(version.uri)
        ModelVersion.objects.filter(pk=version.pk).update(
            size_bytes=0,
            validation_error=f"not imported yet: {type(e).__name__}: {e}"[:2000],
            info={**version.info, "import": IMPORT_QUEUED},
        )
        raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    updated = ModelVersion.objects.filter(pk=version.pk, status=ValidationStatus.PENDING).update(
        files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        size_bytes=sum(f.size for f in files),
        info={**version.info, **info, "import": IMPORT_DONE},
        validation_error="",
    )
    if not updated:  # deleted meanwhile: take the files out again
        storage.store().remove_dir(version.uri)
        return None
    version.refresh_from_db()
    model_validation_start(version)
    return version
