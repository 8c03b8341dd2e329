"""An organization's model registry: completing a model upload, validating it in the sandbox, reading it,
and resolving `owner/name@version` for a job's `model.base`.

Completing checks the assembled files (env_registry/model_files.py: kinds of file, no remote code, the
safetensors headers) and refuses with the reason, deleting the upload, before anything is stored. A version
that passes is published at `<org prefix>/models/<name>/<version>` (numbered 1, 2, ... per model) and left
`pending` until `gpu_runtime/model_check.py` ran in the sandbox (the web tier never imports transformers or
torch): inline or in a Celery task, as ENV_VALIDATION_MODE says for environment packages. Jobs may use only
a `valid` version. Models are private to their organization (there is no public model marketplace yet).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from env_registry import uploads
from env_registry.model_files import DeclaredFile, ModelFilesError, contents_check, files_check, is_adapter
from env_registry.models import ModelVersion, RegisteredModel, Upload, ValidationStatus
from env_registry.registry_uris import registry_location
from opentinker.env.sandbox import Sandbox, SandboxError, SandboxLimits, SandboxUnavailable
from opentinker.spec import MODEL_PRESETS, ModelRef, parse_registry_ref
from portal import storage
from portal.errors import DomainError, NotFound
from portal.models import Organization
from portal.services.enqueue import enqueue
from portal.services.model_refs import ResolvedModel

log = logging.getLogger(__name__)
_ERROR_MAX = 2000
# Loading transformers and torch in the sandbox takes seconds and more address space than an environment.
CHECK_LIMITS = SandboxLimits(
    cpu_s=300, memory_mb=8192, file_mb=64, open_files=256, max_processes=64, call_timeout_s=300
)


def model_upload_start(
    *, organization: Organization, user, name: str, files: list[DeclaredFile], description=""
):
    try:
        files_check(files)
    except ModelFilesError as e:
        raise DomainError(str(e), field="files") from None
    return uploads.upload_start(
        organization=organization,
        user=user,
        kind=Upload.Kind.MODEL,
        name=name,
        files=files,
        description=description,
    )


def model_upload_complete(upload: Upload) -> ModelVersion:
    """Check the uploaded files and store them as the next version; a refusal deletes the upload and leaves
    nothing stored. One completion of an upload runs at a time (uploads.upload_completing)."""
    with uploads.upload_completing(upload):
        fresh = Upload.objects.select_related("organization", "user").get(pk=upload.pk)
        return _model_upload_complete(fresh)


def _model_upload_complete(upload: Upload) -> ModelVersion:
    """Check the uploaded files and store them as the model's next version (pending validation); a refusal
    deletes the upload and leaves nothing stored."""
    uploads.upload_check_arrived(upload)
    files = [DeclaredFile(f["path"], f["size"], f["sha256"]) for f in upload.files]
    root: Path | None = None
    try:
        root = uploads.upload_assemble(upload)
        info = contents_check(root, files)
        if is_adapter(f.path for f in files):
            info |= adapter_base_pin(upload.organization, root)
    except (ModelFilesError, DomainError) as e:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        # Refused (or the bytes do not match): nothing of it stays; the client starts over.
        uploads.upload_discard(upload)
        raise DomainError(str(e), field="files") from None
    version = model_version_store(
        organization=upload.organization,
        user=upload.user,
        name=upload.name,
        description=upload.description,
        root=root,
        files=upload.files,
        size_bytes=upload.size_bytes,
        info=info,
        upload=upload,
    )
    uploads.upload_discard(upload)  # the chunks (the row went with the version's transaction)
    model_validation_start(version)
    return version


def model_version_store(
    *,
    organization: Organization,
    user,
    name: str,
    description: str,
    root: Path,
    files: list[dict],
    size_bytes: int,
    info: dict,
    upload: Upload | None = None,
) -> ModelVersion:
    """Store the checked directory `root` as the model's next version (pending validation); `root` is gone
    afterwards. The version row and the files go in together: a failed commit takes the files out again."""
    published = None
    try:
        with transaction.atomic():
            model, _ = RegisteredModel.objects.get_or_create(
                organization=organization, name=name, defaults={"description": description}
            )
            model = RegisteredModel.objects.select_for_update().get(pk=model.pk)  # numbers one at a time
            number = (model.versions.aggregate(n=Max("version"))["n"] or 0) + 1
            uri = storage.file_uri(
                storage.organization_prefix(organization.slug), f"models/{model.name}/{number}"
            )
            version = ModelVersion.objects.create(
                model=model,
                version=number,
                uri=uri,
                files=[{k: f[k] for k in ("path", "size", "sha256")} for f in files],
                size_bytes=size_bytes,
                info=info,
                uploaded_by=user,
            )
            if upload is not None:
                Upload.objects.filter(pk=upload.pk).delete()
            storage.store().publish_dir(root, uri)
            published = uri
    except BaseException:
        if published:  # the commit failed after the files went in: take them out again
            storage.store().remove_dir(published)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return version


# --- PEFT adapters -----------------------------------------------------------------------------------------

BASE_FILE = "opentinker_base.json"  # written by the platform beside an adapter's files: its resolved base


def adapter_base_pin(organization: Organization, root: Path) -> dict:
    """An adapter's base (adapter_config.json's base_model_name_or_path) must be a preset or a valid model of
    the organization's registry (`owner/name@N`); its resolution is written beside the adapter (BASE_FILE),
    which the runtime reads to load the base and merge the adapter into it."""
    config = json.loads((root / "adapter_config.json").read_bytes())
    if config.get("peft_type") != "LORA":
        raise ModelFilesError(
            f"adapter_config.json: only LoRA adapters are taken (not {config.get('peft_type')})"
        )
    base = config.get("base_model_name_or_path")
    ref = parse_registry_ref(base) if isinstance(base, str) else None
    if isinstance(base, str) and base in MODEL_PRESETS:
        pinned = {"base": base, "base_source": base}
    elif ref is not None:
        try:
            resolved = ModelResolver().resolve(organization, ref)
        except NotFound as e:
            raise ModelFilesError(f"adapter_config.json: base_model_name_or_path {base!r}: {e}") from None
        pinned = {"base": resolved.ref, "base_source": resolved.uri}
    else:
        raise ModelFilesError(
            f"adapter_config.json: base_model_name_or_path must be a preset or a model of your registry "
            f"(owner/name@N), not {base!r}"
        )
    (root / BASE_FILE).write_text(json.dumps({"base": pinned["base_source"], "ref": pinned["base"]}))
    return {"kind": "adapter", **pinned}


# --- validation in the sandbox ------------------------------------------------------------------------------


# How the sandbox reports the checker's own refusal (gpu_runtime/model_check.py raises ValueError with the
# reason): the only failure that makes a version invalid.
CHECKER_REFUSAL = "reset raised ValueError: "


class ValidationDeferred(RuntimeError):
    """The check ended without a verdict for a reason that is not the model's: the version stays pending and
    the Celery task retries (workers/env_tasks.py)."""


def model_validation_start(version: ModelVersion) -> None:
    if settings.ENV_VALIDATION_MODE == "celery":
        enqueue("env_registry.validate_model_version", version.pk, expires=3600)
        return
    with contextlib.suppress(SandboxUnavailable, ValidationDeferred):  # stays pending with its reason
        model_validate(version.pk)
    version.refresh_from_db()


def _checker_source() -> Path:
    # Found on disk, never imported: the web tier does not import gpu_runtime (find_spec of a top-level
    # package locates it without running it).
    spec = importlib.util.find_spec("gpu_runtime")
    if spec is None or spec.origin is None:
        raise SandboxUnavailable("gpu_runtime is not installed here: models cannot be validated on this host")
    return Path(spec.origin).parent / "model_check.py"


def model_check_in_sandbox(model_dir: Path) -> dict:
    """Run gpu_runtime/model_check.py on `model_dir` in the sandbox; its report, or SandboxError (why)."""
    with tempfile.TemporaryDirectory(prefix="otk-model-check-") as tmp:
        pkg = Path(tmp) / "pkg"
        pkg.mkdir()
        shutil.copyfile(_checker_source(), pkg / "model_check.py")
        shutil.copytree(model_dir, pkg / "model")
        with Sandbox(
            "model_check:ModelCheck", {"model_dir": "/package/model"}, package_dir=pkg, limits=CHECK_LIMITS
        ) as sb:
            return sb.call("reset", 0)


def model_validate(version_id: int) -> ModelVersion | None:
    """Validate a pending version in the sandbox; idempotent (acts on pending only, verdict written once)."""
    version = ModelVersion.objects.select_related("model__organization").filter(pk=version_id).first()
    if version is None or version.status != ValidationStatus.PENDING:
        return version
    if version.info.get("import") in ("queued", "fetching"):  # hub_import's task fills it first
        return version
    local: Path | None = None
    report: dict = {}
    try:
        local = storage.store().download_dir(version.uri)
        report = model_check_in_sandbox(local)
    except SandboxUnavailable as e:
        log.error("model %s not validated: %s", version, e)
        ModelVersion.objects.filter(pk=version.pk, status=ValidationStatus.PENDING).update(
            validation_error=f"not validated yet: {e}"[:_ERROR_MAX]
        )
        raise
    except Exception as e:
        if not (isinstance(e, SandboxError) and str(e).startswith(CHECKER_REFUSAL)):
            # Not the model's fault (a sandbox timeout or crash, the task's time limit, memory, storage):
            # no verdict; the version stays pending with the reason and the task retries.
            log.exception("model %s not validated", version)
            ModelVersion.objects.filter(pk=version.pk, status=ValidationStatus.PENDING).update(
                validation_error=f"not validated yet: {type(e).__name__}: {e}"[:_ERROR_MAX]
            )
            raise ValidationDeferred(f"{version}: {type(e).__name__}: {e}") from e
        # "reset raised ValueError: <why>" -> "<why>": the checker's reasons are written for people.
        error = str(e).removeprefix(CHECKER_REFUSAL) or type(e).__name__
        status = ValidationStatus.INVALID
    else:
        error, status = "", ValidationStatus.VALID
    finally:
        if local is not None and not version.uri.startswith("file://"):
            shutil.rmtree(local, ignore_errors=True)
    ModelVersion.objects.filter(pk=version.pk, status=ValidationStatus.PENDING).update(
        status=status,
        validation_error=error[:_ERROR_MAX],
        validated_at=timezone.now(),
        info={**version.info, **report},
    )
    version.refresh_from_db()
    log.info("model %s validated: %s %s", version, version.status, version.validation_error)
    return version


# --- reads --------------------------------------------------------------------------------------------------


def model_list(organization: Organization):
    return RegisteredModel.objects.filter(organization=organization).prefetch_related("versions")


def model_get(organization: Organization, name: str) -> RegisteredModel:
    model = model_list(organization).filter(name=name).first()
    if model is None:
        raise NotFound(f"no model {organization.slug}/{name} in your organization")
    return model


def model_version_get(model: RegisteredModel, version: str) -> ModelVersion:
    versions = list(model.versions.all())
    if version == "latest":
        valid = [v for v in versions if v.status == ValidationStatus.VALID]
        if not valid:
            raise NotFound(f"{model} has no valid version yet")
        return max(valid, key=lambda v: v.version)
    found = next((v for v in versions if str(v.version) == version), None)
    if found is None:
        raise NotFound(f"{model} has no version {version}")
    return found


class ModelResolver:
    """The registry's implementation of portal.services.model_refs.ModelResolver."""

    def resolve(self, organization: Organization, ref: ModelRef) -> ResolvedModel:
        if ref.owner != organization.slug:
            # Models are private to their organization: another's is as absent as a missing one.
            raise NotFound(f"no model {ref.owner}/{ref.name} in your organization")
        version = model_version_get(model_get(organization, ref.name), ref.version)
        if version.status != ValidationStatus.VALID:
            why = f": {version.validation_error}" if version.validation_error else ""
            raise NotFound(f"{ref.owner}/{ref.name}@{version.version} is {version.status}, not valid{why}")
        return ResolvedModel(ref=f"{ref.owner}/{ref.name}@{version.version}", uri=version.uri)

    def uri_problem(self, organization: Organization, uri: str) -> str | None:
        """Why a raw URI under the organization's models/ may not be used (None: not there, or a valid
        version's directory)."""
        where = registry_location(organization, uri, "models")
        if where is None or isinstance(where, str):
            return where
        name, number = where
        version = ModelVersion.objects.filter(
            model__organization=organization, model__name=name, version=number
        ).first()
        if version is None:
            return f"{uri!r} is not a version of a model in your organization's registry"
        if version.status != ValidationStatus.VALID:
            why = f": {version.validation_error}" if version.validation_error else ""
            ref = f"{organization.slug}/{name}@{number}"
            return f"{uri!r} is {ref}, which is {version.status}, not valid{why}"
        return None
