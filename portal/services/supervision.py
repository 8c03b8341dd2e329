"""What happens to a job after admission: launched, heartbeats, exit, loss, preemption, release.

These are the database halves; the process halves (starting, signalling, probing runtimes) live in
``workers/`` drivers. Each function re-reads and locks the rows and acts only when the state still calls for
it, so a duplicated or late Celery message, or a runtime reporting at the same moment as the reaper, is
harmless.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from opentinker.spec import TERMINAL_STATES, JobState
from portal.actors import Actor
from portal.errors import Conflict
from portal.models import Allocation, AuditAction, Job, JobEvent, JobLog
from portal.services import live
from portal.services.audit import audit_record
from portal.services.enqueue import enqueue
from portal.services.jobs import job_event_add, job_transition
from portal.services.model_servers import model_server_lost_unneeded
from portal.services.usage import allocation_account

S = JobState
SYSTEM = Actor.system("supervisor")


def max_lost_retries() -> int:
    return settings.OPENTINKER_JOB_MAX_RETRIES


def live_allocation(job: Job) -> Allocation | None:
    return Allocation.objects.filter(job=job, released_at__isnull=True).first()


def allocation_release(alloc: Allocation, *, reason: str, now: datetime | None = None) -> None:
    """Charge the allocation up to now and give its capacity back. Idempotent."""
    now = now or timezone.now()
    with transaction.atomic():
        locked = Allocation.objects.select_for_update().get(pk=alloc.pk)
        if locked.released_at is not None:
            return
        allocation_account(locked.pk, now=now)
        Allocation.objects.filter(pk=locked.pk).update(released_at=now, release_reason=reason[:200])
    enqueue("workers.schedule", expires=30)  # capacity freed: let queued jobs in


def job_launched(*, allocation_id: int, handle: str, host: str, log_path: str = "") -> bool:
    """The driver started the runtime: record where, and move the job to running."""
    now = timezone.now()
    with transaction.atomic():
        alloc = Allocation.objects.select_for_update().select_related("job").get(pk=allocation_id)
        job = Job.objects.select_for_update().get(pk=alloc.job_id)
        if alloc.released_at is not None:
            return False
        Allocation.objects.filter(pk=alloc.pk).update(
            runtime_handle=handle[:200],
            runtime_host=host[:200],
            log_path=log_path[:500],
            launched_at=alloc.launched_at or now,
            heartbeat_at=now,
        )
        if job.state == S.ADMITTED:
            job_transition(
                job=job,
                to=S.RUNNING,
                actor=SYSTEM,
                reason=f"started on pool {alloc.pool.name}",
                data={"pool": alloc.pool.name, "handle": handle, "host": host, "attempt": alloc.attempt},
            )
        return True


def allocation_heartbeat(allocation_id: int) -> None:
    Allocation.objects.filter(pk=allocation_id, released_at__isnull=True).update(heartbeat_at=timezone.now())


def _lost_retries(job: Job) -> int:
    return JobEvent.objects.filter(
        job=job, kind=JobEvent.Kind.STATE, to_state=S.QUEUED, data__requeue="lost"
    ).count()


def job_requeue(*, job: Job, why: str, reason: str, actor: Actor = SYSTEM) -> Job:
    """Give the job's capacity back and queue it again (it resumes from its last checkpoint).

    ``why`` is ``lost`` (worker, node or runtime died: counts against the retry limit, then the job fails)
    or ``preempted`` (borrowed capacity reclaimed, or an admin's preemption: never counts). A lost Tinker
    model server with nothing needing it ends instead (portal/services/model_servers.py).
    """
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        alloc = live_allocation(job)
        if alloc is not None:
            allocation_release(alloc, reason=f"{why}: {reason}")
        state = S(job.state)
        if state not in (S.ADMITTED, S.RUNNING, S.CANCELLING):
            return job
        if state is S.CANCELLING:
            return job_transition(job=job, to=S.CANCELLED, actor=actor, reason=f"cancelled ({reason})")
        if why == "lost" and state is S.RUNNING and (unneeded := model_server_lost_unneeded(job)):
            # A Tinker model server nobody needs now: restarting it would only idle out.
            return job_transition(
                job=job,
                to=S.SUCCEEDED,
                actor=actor,
                reason=f"{reason}; {unneeded}",
                data={"lost": True, "restarted": False},
            )
        if why == "lost" and _lost_retries(job) >= max_lost_retries():
            return job_transition(
                job=job,
                to=S.FAILED,
                actor=actor,
                reason=f"{reason}; gave up after {max_lost_retries()} retries",
                data={"lost": True},
            )
        job = job_transition(job=job, to=S.QUEUED, actor=actor, reason=reason, data={"requeue": why})
    enqueue("workers.schedule", expires=30)
    return job


def job_process_exited(*, allocation_id: int, exit_code: int | None, detail: str = "") -> Job | None:
    """The runtime of this allocation is gone (exit code; negative = killed by that signal; None = unknown).

    Decides the job's outcome unless the runtime already reported one through ingest.
    """
    with transaction.atomic():
        alloc = Allocation.objects.select_for_update().filter(pk=allocation_id).first()
        if alloc is None:
            return None
        job = Job.objects.select_for_update().get(pk=alloc.job_id)
        Allocation.objects.filter(pk=alloc.pk).update(exit_code=exit_code)
        if alloc.released_at is not None:
            return job
        state = S(job.state)
        tail = f": {detail[-1500:]}" if detail else ""
        if state in TERMINAL_STATES or state is S.QUEUED:
            allocation_release(alloc, reason=f"runtime exited ({exit_code})")
            return job
        if state is S.ADMITTED:  # it exited before the launcher recorded the start
            job = job_transition(job=job, to=S.RUNNING, actor=SYSTEM, reason="started")
            state = S.RUNNING
        if state is S.CANCELLING:
            allocation_release(alloc, reason="cancelled")
            return job_transition(
                job=job,
                to=S.CANCELLED,
                actor=SYSTEM,
                reason="stopped after cancellation",
                data={"exit_code": exit_code},
            )
        if alloc.preempt_requested_at is not None:
            return job_requeue(job=job, why="preempted", reason="preempted: checkpointed and re-queued")
        if exit_code == 0:
            allocation_release(alloc, reason="succeeded")
            return job_transition(job=job, to=S.SUCCEEDED, actor=SYSTEM, reason="runtime exited with code 0")
        if exit_code is None or exit_code < 0:
            what = "runtime process lost" if exit_code is None else f"runtime killed by signal {-exit_code}"
            return job_requeue(job=job, why="lost", reason=what)
        allocation_release(alloc, reason=f"failed ({exit_code})")
        return job_transition(
            job=job,
            to=S.FAILED,
            actor=SYSTEM,
            reason=f"runtime exited with code {exit_code}{tail}",
            data={"exit_code": exit_code},
        )


def job_preempt(*, job: Job, actor: Actor, reason: str = "") -> Job:
    """Ask a job to checkpoint and give its capacity back; it is re-queued when its runtime stops."""
    reason = reason.strip()[:300] or f"preempted by {actor.label}"

    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        state = S(job.state)
        alloc = live_allocation(job)
        if state is S.ADMITTED or (state is S.RUNNING and alloc is not None and alloc.launched_at is None):
            _audit_preempt(job, actor, reason, state)
            return job_requeue(job=job, why="preempted", reason=reason, actor=actor)
        if state is not S.RUNNING or alloc is None:
            raise Conflict(f"only an admitted or running job can be preempted (this one is {state.value})")
        if alloc.preempt_requested_at is None:
            allocation_preempt_request(alloc, reason=reason, actor=actor)
            _audit_preempt(job, actor, reason, state)
        return job


def _audit_preempt(job: Job, actor: Actor, reason: str, state) -> None:
    audit_record(
        AuditAction.JOB_PREEMPTED,
        organization=job.organization,
        user=actor.user,
        target=("job", job.pk, job.name),
        details={"reason": reason, "state": state.value, "attempt": job.attempt},
    )


def allocation_preempt_request(alloc: Allocation, *, reason: str, actor: Actor = SYSTEM) -> None:
    with transaction.atomic():
        updated = Allocation.objects.filter(
            pk=alloc.pk, released_at__isnull=True, preempt_requested_at__isnull=True
        ).update(preempt_requested_at=timezone.now())
        if not updated:
            return
        job_event_add(
            job=alloc.job,
            actor=actor,
            kind=JobEvent.Kind.WARNING,
            message=f"preemption requested: {reason}; the job checkpoints and is re-queued",
            data={"preempt": True, "allocation": alloc.pk},
        )
    enqueue("workers.stop_allocation", alloc.pk, "preempt", expires=300)


def job_stop_requested(job: Job) -> str:
    """What the runtime should do at its next step boundary: '' (go on), 'cancel' or 'preempt'.

    The ingest's cancel-flag endpoint can answer with this.
    """
    if job.state == S.CANCELLING:
        return "cancel"
    if job.state in TERMINAL_STATES:
        return "cancel"
    alloc = live_allocation(job)
    if alloc is not None and alloc.preempt_requested_at is not None:
        return "preempt"
    return ""


def job_log_append(*, job_id, lines: list[tuple[str, str]]) -> int:
    """Append captured output lines (stream, text) to the job's log; numbered after the last line.

    Numbers are taken under the job's row lock, so the ingest API appending at the same time never collides.
    """
    if not lines:
        return 0
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            return 0
        last = JobLog.objects.filter(job=job).aggregate(m=Max("seq"))["m"] or 0
        rows = [
            JobLog(job=job, seq=last + i, stream=stream[:10], line=text[:4000])
            for i, (stream, text) in enumerate(lines, start=1)
        ]
        JobLog.objects.bulk_create(rows)
    with contextlib.suppress(Exception):  # live streaming is best effort; the rows are the truth
        live.publish_on_commit(job_id, "log", live.log_payload(rows))
    return len(rows)
