"""Resume a finished job: submit a new job with the same spec that starts from the old job's last checkpoint.

A job that failed or was cancelled keeps its checkpoints; the runtime restores model, optimizer and
data-loader state from `resume_from` and continues to the spec's `steps`, so the new job picks up exactly
where the old one stopped.
"""

from __future__ import annotations

from opentinker.spec import JobSpec, JobState
from portal.actors import Actor
from portal.errors import Conflict
from portal.models import Checkpoint, Job
from portal.services.jobs import job_submit

RESUMABLE = frozenset({JobState.FAILED.value, JobState.CANCELLED.value})


def job_resume(*, job: Job, actor: Actor) -> Job:
    if job.state not in RESUMABLE:
        raise Conflict(f"only a failed or cancelled job can be resumed; this one is {job.state}")
    last = Checkpoint.objects.filter(job=job).order_by("-step").first()
    if last is None:
        raise Conflict("this job saved no checkpoint to resume from; submit it again instead")
    spec = JobSpec.model_validate(job.spec)
    name = f"{spec.display_name[:88]}-resumed"
    resumed = spec.model_copy(update={"resume_from": last.uri, "name": name})
    # Validated again (name and URI rules) exactly as a submission from the API would be.
    resumed = JobSpec.model_validate(resumed.model_dump(mode="json"))
    new_job, _ = job_submit(organization=job.organization, actor=actor, spec=resumed)
    return new_job
