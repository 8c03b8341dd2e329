"""Promoting a job's checkpoint into its organization's model registry, server side.

The checkpoint's model files are copied within the object store (never through the client), each one's size
and sha256 checked against what the runtime recorded for it, then checked like an upload
(env_registry/model_files.py) and stored as the model's next version, validated in the sandbox before use.
Trainer state (`trainer_state.pt`) and the checkpoint's `meta.json` are left out. A full fine-tuning
checkpoint becomes a Hugging Face model directory; a LoRA checkpoint becomes a registry adapter: its files
without the base's `config.json`, with its base pinned beside it (model_registry.BASE_FILE) as the job
loaded it: the base's URI (a registry version or a model in the organization's storage) or a preset with the
job's seed (a preset's weights are a seeded random init, so the seed is part of the base).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from hashlib import sha256
from pathlib import Path, PurePosixPath

from django.conf import settings

from env_registry.model_files import DeclaredFile, ModelFilesError, contents_check, files_check
from env_registry.model_registry import BASE_FILE, model_validation_start, model_version_store
from env_registry.models import ModelVersion
from env_registry.selectors import NAME_RE
from env_registry.uploads import registry_bytes_used
from opentinker.spec import MODEL_PRESETS
from portal import storage
from portal.errors import DomainError, NotFound
from portal.models import Checkpoint, Job, Organization

# What a checkpoint holds beside the model: resume state and the checkpoint's own record.
LEFT_OUT = ("trainer_state.pt", "meta.json")


def checkpoint_pick(job: Job, step: int | None) -> Checkpoint:
    """The job's checkpoint at `step`, or its latest."""
    checkpoints = list(Checkpoint.objects.filter(job=job).order_by("step"))
    if not checkpoints:
        raise NotFound("this job has no checkpoints yet")
    if step is None:
        return checkpoints[-1]
    found = next((c for c in checkpoints if c.step == step), None)
    if found is None:
        steps = ", ".join(str(c.step) for c in checkpoints[-20:])
        raise NotFound(f"no checkpoint at step {step} (steps: {steps})")
    return found


def _adapter_base(job: Job) -> dict:
    """How the job loaded its base model, pinned beside the promoted adapter."""
    model = (job.spec or {}).get("model") or {}
    base, ref = model.get("base"), model.get("registry_ref")
    if not isinstance(base, str) or not base:
        raise DomainError("the job's spec names no base model", field="job")
    if base in MODEL_PRESETS:
        return {"base": base, "ref": base, "seed": int((job.spec or {}).get("seed") or 0)}
    return {"base": base, "ref": ref or base}


def model_promote(
    *,
    organization: Organization,
    user,
    job: Job,
    step: int | None,
    name: str,
    description: str = "",
) -> ModelVersion:
    """Store the checkpoint of `job` at `step` (default: the latest) as `name`'s next version (pending
    validation). `job` was looked up in `organization`; a refusal stores nothing."""
    if not NAME_RE.match(name or ""):
        raise DomainError("name is 1-64 lowercase letters, digits, '-' or '_'", field="name")
    checkpoint = checkpoint_pick(job, step)
    if not storage.organization_may_read(checkpoint.uri, organization.slug):
        raise DomainError("the checkpoint is outside your organization's storage", field="step")
    records = [f for f in checkpoint.files if PurePosixPath(str(f.get("name", ""))).name not in LEFT_OUT]
    if any("/" in str(f.get("name", "")) for f in records):
        raise DomainError(
            "a multi-agent checkpoint holds one model per policy: download the policy you want "
            "(`opentinker jobs download`) and push it with `opentinker models push`",
            field="step",
        )
    names = {f["name"] for f in records}
    adapter = "adapter_config.json" in names
    if adapter:  # the base's config is the base's, not the adapter's
        records = [f for f in records if f["name"] != "config.json"]
    files = [DeclaredFile(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in records]
    try:
        files_check(files)
    except ModelFilesError as e:
        raise DomainError(f"step {checkpoint.step}: {e}", field="step") from None
    total = sum(f.size for f in files)
    used = registry_bytes_used(organization)
    if used + total > settings.REGISTRY_MAX_BYTES:
        raise DomainError(
            f"the checkpoint's model is {total} bytes; your organization's models and datasets may take "
            f"{settings.REGISTRY_MAX_BYTES} bytes and {used} are in use (REGISTRY_MAX_BYTES)",
            field="step",
        )
    root = Path(tempfile.mkdtemp(prefix="otk-promote-"))
    try:
        store = storage.store()
        for f in files:
            target = root / f.path
            store.download_file(storage.file_uri(checkpoint.uri, f.path), target)
            h = sha256()
            with target.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
            if target.stat().st_size != f.size or h.hexdigest() != f.sha256:
                raise DomainError(
                    f"step {checkpoint.step}: {f.path} does not match what the runtime recorded for it "
                    "(size or sha256): the checkpoint is damaged",
                    field="step",
                )
        info = contents_check(root, files)
        if adapter:
            pin = _adapter_base(job)
            (root / BASE_FILE).write_text(json.dumps(pin))
            info |= {"kind": "adapter", "base": pin["ref"], "base_source": pin["base"]}
    except ModelFilesError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise DomainError(f"step {checkpoint.step}: {e}", field="step") from None
    except FileNotFoundError:
        shutil.rmtree(root, ignore_errors=True)
        raise DomainError(f"step {checkpoint.step}: the checkpoint's files are gone", field="step") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    version = model_version_store(
        organization=organization,
        user=user,
        name=name,
        description=description or f"promoted from job {job.id} step {checkpoint.step}",
        root=root,
        files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        size_bytes=total,
        info={**info, "source": f"job:{job.id}@{checkpoint.step}"},
    )
    model_validation_start(version)
    return version
