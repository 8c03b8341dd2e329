"""Pool drivers: how a job's runtime is started, stopped and watched on a pool.

- ``local``: a supervised subprocess on this machine (``workers.runner`` watches it).
- ``ray``: a Ray job submitted through Ray's Job Submission API to the pool's cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings

from portal import storage
from portal.models import MODEL_SERVER_KIND, Allocation, Checkpoint, ComputePool, Job
from portal.services.egress import runtime_egress_env
from portal.services.env_secrets import REMOTE_SECRET_VAR, environment_secret_reveal
from portal.services.job_tokens import job_runtime_env
from portal.services.model_servers import model_server_env
from workers.drivers.base import Driver, Launched, runtime_command
from workers.drivers.local import LocalDriver
from workers.drivers.ray import RayDriver

__all__ = ["Driver", "Launched", "driver_for", "job_env", "runtime_command", "work_dir", "write_spec"]

# A pool's ``driver`` field names its class here; a pool of an unknown kind runs locally, as before.
DRIVERS: dict[str, type[Driver]] = {ComputePool.Driver.LOCAL: LocalDriver, ComputePool.Driver.RAY: RayDriver}


def checkpoint_uri(job: Job) -> str:
    return f"{storage.organization_prefix(job.organization.slug)}/jobs/{job.id}"


def job_env(job: Job, alloc: Allocation) -> dict[str, str]:
    """What the runtime gets to know: where to report, its token, its job, where to write checkpoints."""
    env = job_runtime_env(job)
    env["OPENTINKER_CHECKPOINT_URI"] = checkpoint_uri(job)
    env["OPENTINKER_ATTEMPT"] = str(alloc.attempt)
    resume = latest_checkpoint(job)
    if resume:
        env["OPENTINKER_RESUME_FROM"] = resume
    if job.kind == MODEL_SERVER_KIND:
        # A Tinker model server: its queue, the Tinker ingest and its base model's token (the Ray driver keeps
        # the last two out of the cluster's job API: the runtime redeems its bootstrap token for them).
        env.update(model_server_env(job))
    ref = str((job.spec.get("environment") or {}).get("ref", ""))
    if ref.startswith(("https://", "http://")):
        # The runtime checks the policy again at connect time, with this job's (organization's, pool's) list.
        env.update(runtime_egress_env(job.organization.slug, alloc.pool.name))
    secret = (job.spec.get("environment") or {}).get("secret")
    if secret:
        # Only here, in the process environment: never in the spec file, logs, events or the API. Raises
        # EnvironmentSecretMissing (the launcher fails the job) if it was deleted since submission.
        env[REMOTE_SECRET_VAR] = environment_secret_reveal(job.organization, secret)
    return env


def latest_checkpoint(job: Job) -> str:
    ck = Checkpoint.objects.filter(job=job).order_by("-step").first()
    return ck.uri if ck else ""


def runtime_spec(job: Job) -> dict[str, Any]:
    """The spec the runtime receives: the stored one, resuming from the last checkpoint after a re-queue."""
    spec = dict(job.spec)
    resume = latest_checkpoint(job)
    if resume:
        spec["resume_from"] = resume
    return spec


def work_dir(job: Job, attempt: int) -> Path:
    root = Path(settings.OPENTINKER_JOBS_DIR)
    path = root / str(job.id) / f"attempt-{attempt}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_spec(job: Job, path: Path) -> Path:
    spec_path = path / "spec.json"
    spec_path.write_text(json.dumps(runtime_spec(job), indent=2))
    return spec_path


def driver_for(pool: ComputePool) -> Driver:
    return DRIVERS.get(pool.driver, LocalDriver)(pool)
