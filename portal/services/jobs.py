"""Job submission, the job state machine and cancellation.

Every state change goes through ``job_transition``, which locks the row, checks the transition is allowed and
records an event saying who, when and why.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from opentinker.spec import TERMINAL_STATES, JobKind, JobSpec, JobState
from portal import storage
from portal.actors import Actor
from portal.errors import Conflict, DomainError, NotFound, QuotaExceeded
from portal.models import AuditAction, Job, JobEvent, Organization, Quota
from portal.services import env_refs, live, model_refs
from portal.services.audit import audit_record
from portal.services.egress import egress_check
from portal.services.enqueue import enqueue
from portal.services.env_refs import ResolvedEnvironment
from portal.services.env_secrets import environment_secret_exists

S = JobState
# The job state machine. `running -> queued` and `admitted -> queued` are re-queues (preemption, lost worker);
# `cancelling` waits for the runtime to stop at its next step boundary.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.ADMITTED, S.CANCELLED, S.FAILED}),
    S.ADMITTED: frozenset({S.RUNNING, S.QUEUED, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLING, S.QUEUED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED, S.SUCCEEDED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
MAX_REASON = 500
MAX_IDEMPOTENCY_KEY = 100


def _check_request_size(spec: JobSpec, quota: Quota) -> None:
    res = spec.resources
    if res.gpus > quota.max_gpus_per_job:
        raise QuotaExceeded(
            f"the job asks for {res.gpus} GPUs; your organization may use at most {quota.max_gpus_per_job} "
            f"({quota.max_gpus} nominal + {quota.borrowing_limit_gpus} borrowed)",
            field="resources.gpus",
        )
    if res.cpus > quota.max_cpus_per_job:
        raise QuotaExceeded(
            f"the job asks for {res.cpus} CPUs; at most {quota.max_cpus_per_job} per job",
            field="resources.cpus",
        )
    if res.gpus and res.gpus * res.max_hours > quota.gpu_hours_per_month:
        raise QuotaExceeded(
            f"{res.gpus} GPUs x {res.max_hours} h = {res.gpus * res.max_hours:g} GPU-hours is more than your "
            f"monthly {quota.gpu_hours_per_month} GPU-hours",
            field="resources.max_hours",
        )
    if res.pool and quota.allowed_pools and res.pool not in quota.allowed_pools:
        raise DomainError(
            f"pool {res.pool!r} is not open to your organization (allowed: {', '.join(quota.allowed_pools)})",
            field="resources.pool",
        )


def _check_references(spec: JobSpec, organization: Organization, actor: Actor) -> ResolvedEnvironment | None:
    """Check what the spec points at, as the submitting user sees it (a private package only for its
    publishers and admins); returns the registry environment it uses (or None), resolved through the
    interface the registry registers (portal.services.env_refs)."""
    version = None
    ref = spec.environment.registry_ref if spec.environment else None
    if ref is not None:
        try:
            version = env_refs.resolver().resolve(organization, actor.user, ref)
        except NotFound as e:
            raise DomainError(str(e), field="environment.ref") from None
        wanted = spec.environment.sha256
        if wanted and wanted != (version.sha256 or None):
            actual = version.sha256 or "(none: a built-in has no archive)"
            raise DomainError(
                f"{ref.owner}/{ref.name}@{version.version} has sha256 {actual}, not {wanted}",
                field="environment.sha256",
            )
        if spec.multi_agent is not None:
            errors = spec.multi_agent.role_errors(
                f"{ref.owner}/{ref.name}", list(version.roles), rule_player=version.rule_based_player
            )
            if errors:
                raise DomainError("; ".join(errors), field="multi_agent.roles")
    if spec.environment is not None and ref is None:  # a remote environment server
        egress_check(spec.environment.ref, organization_slug=organization.slug, pool=spec.resources.pool)
    # Resolved in the job's own organization only; the launcher decrypts it (workers/drivers).
    secret = spec.environment.secret if spec.environment else None
    if secret and not environment_secret_exists(organization, secret):
        raise DomainError(
            f"your organization has no environment secret named {spec.environment.secret!r}",
            field="environment.secret",
        )
    uris = {
        "model.base": "" if spec.model.is_preset else spec.model.base,
        "dataset.uri": spec.dataset.uri if spec.dataset else "",
        "resume_from": spec.resume_from or "",
    }
    for name, policy in (spec.multi_agent.policies if spec.multi_agent else {}).items():
        if policy.model is not None and not policy.model.is_preset:  # each policy's runtime loads it too
            uris[f"multi_agent.policies.{name}.model.base"] = policy.model.base
    prefix = storage.organization_prefix(organization.slug)
    for field, uri in uris.items():
        # A job reads only its own organization's objects: never another tenant's checkpoints or data.
        if uri and not storage.organization_may_read(uri, organization.slug):
            raise DomainError(f"{uri!r} is not in your organization's storage ({prefix}/...)", field=field)
        # Raw URIs into the registry's folders (resolved refs too: one query) must be a usable version.
        for registry in (model_refs.resolver(), model_refs.dataset_resolver()):
            problem = registry.uri_problem(organization, uri) if uri else None
            if problem:
                raise DomainError(problem, field=field)
    return version


def _columns_problem(spec: JobSpec, ref: str, have: tuple[str, ...]) -> str | None:
    """Why the registry dataset `ref` (with columns `have`) cannot feed this job's column mapping, or the
    default column names when the spec gives none; None when it can. The runtime reads the same names."""
    assert spec.dataset is not None
    mapping = spec.dataset.columns
    if mapping is None:
        if spec.kind is JobKind.SFT:
            ok = "messages" in have or {"prompt", "completion"} <= set(have)
            wanted = "`messages` column, nor `prompt` and `completion` columns"
        else:
            ok = bool({"prompt", "messages"} & set(have)) and "answer" in have
            wanted = "`prompt` (or `messages`) and `answer` columns"
        if ok:
            return None
        return f"{ref} has no {wanted} (its columns: {', '.join(have)}): map them in dataset.columns"
    missing = [c for c in mapping.values() if c not in have]
    if missing:
        return f"{ref} has no column {missing[0]!r} (its columns: {', '.join(have)})"
    return None


def _model_resolved(spec: JobSpec, organization: Organization) -> JobSpec:
    """A registry model or dataset (`owner/name@version`) replaced by the URI of that exact version's files,
    the pinned reference kept in `registry_ref`: a retried or resumed attempt loads the same bytes."""
    policies = spec.multi_agent.policies if spec.multi_agent else {}
    for name, policy in policies.items():
        if policy.model is not None and policy.model.registry is not None:
            # Not resolved per policy yet: refused here rather than failing in the runtime.
            raise DomainError(
                f"policy {name!r}: registry models are not supported per policy yet; "
                "use the job's model.base",
                field=f"multi_agent.policies.{name}.model.base",
            )
    ref = spec.model.registry
    if ref is not None:
        try:
            resolved = model_refs.resolver().resolve(organization, ref)
        except NotFound as e:
            raise DomainError(str(e), field="model.base") from None
        model = spec.model.model_copy(update={"base": resolved.uri, "registry_ref": resolved.ref})
        spec = spec.model_copy(update={"model": model})
    ref = spec.dataset.registry if spec.dataset else None
    if ref is not None:
        try:
            resolved = model_refs.dataset_resolver().resolve(organization, ref)
        except NotFound as e:
            raise DomainError(str(e), field="dataset.uri") from None
        if resolved.columns:
            problem = _columns_problem(spec, resolved.ref, resolved.columns)
            if problem:
                raise DomainError(problem, field="dataset.columns")
        dataset = spec.dataset.model_copy(update={"uri": resolved.uri, "registry_ref": resolved.ref})
        spec = spec.model_copy(update={"dataset": dataset})
    return spec


def _pinned(spec: JobSpec, version: ResolvedEnvironment | None) -> JobSpec:
    """The spec with its registry environment pinned: the exact version (`latest` resolved) and the archive's
    sha256, so a retried or resumed attempt runs byte-identical code whatever is published later."""
    if version is None or spec.environment is None:
        return spec
    ref = spec.environment.registry_ref
    environment = spec.environment.model_copy(
        update={"ref": f"{ref.owner}/{ref.name}@{version.version}", "sha256": version.sha256 or None}
    )
    return spec.model_copy(update={"environment": environment})


def _same_request(stored: dict[str, Any], spec: JobSpec) -> bool:
    """Whether a repeated submission asks for the stored job: the stored spec is pinned, so the new one is
    compared as if pinned the same way (a `latest` retry after a new release is still the same request)."""
    submitted = spec.model_dump(mode="json")
    ref, model = spec.model.registry, stored.get("model") or {}
    pinned_model = str(model.get("registry_ref") or "")
    if (
        ref is not None
        and pinned_model.startswith(f"{ref.owner}/{ref.name}@")
        and (ref.version in ("latest", pinned_model.rsplit("@", 1)[1]))
    ):
        submitted["model"].update(base=model.get("base"), registry_ref=pinned_model)
    ref, data = (spec.dataset.registry if spec.dataset else None), stored.get("dataset") or {}
    pinned_data = str(data.get("registry_ref") or "")
    if (
        ref is not None
        and pinned_data.startswith(f"{ref.owner}/{ref.name}@")
        and (ref.version in ("latest", pinned_data.rsplit("@", 1)[1]))
    ):
        submitted["dataset"].update(uri=data.get("uri"), registry_ref=pinned_data)
    env, stored_env = submitted.get("environment"), stored.get("environment")
    if env and stored_env and spec.environment.registry_ref is not None:
        ref, pinned = spec.environment.registry_ref, stored_env.get("ref", "")
        if ref.version == "latest" and pinned.startswith(f"{ref.owner}/{ref.name}@"):
            env["ref"] = pinned
        if env.get("sha256") is None:
            env["sha256"] = stored_env.get("sha256")
    return stored == submitted


def job_submit(
    *, organization: Organization, actor: Actor, spec: JobSpec, idempotency_key: str = ""
) -> tuple[Job, bool]:
    """Store a queued job; returns (job, created). A repeated idempotency key returns the first job."""
    with transaction.atomic():
        # Locking the quota row serializes submissions of one organization, so two racing submissions
        # cannot both take the last queue slot (nor both use one idempotency key).
        quota = Quota.objects.select_for_update().get(organization=organization)
        if idempotency_key:
            existing = Job.objects.filter(organization=organization, idempotency_key=idempotency_key).first()
            if existing is not None:
                if not _same_request(existing.spec, spec):
                    raise Conflict("this Idempotency-Key was used for a different job spec")
                return existing, False
        _check_request_size(spec, quota)
        spec = _model_resolved(spec, organization)
        env_version = _check_references(spec, organization, actor)
        spec = _pinned(spec, env_version)
        waiting = Job.objects.filter(organization=organization, state__in=[S.QUEUED, S.ADMITTED]).count()
        if waiting >= quota.max_queued_jobs:
            raise QuotaExceeded(
                f"your organization already has {waiting} jobs waiting (limit {quota.max_queued_jobs}); "
                "wait for some to start or cancel them"
            )
        job = Job.objects.create(
            organization=organization,
            created_by=actor.user,
            name=spec.display_name,
            kind=spec.kind.value,
            state=S.QUEUED.value,
            spec=spec.model_dump(mode="json"),
            spec_version=spec.spec_version,
            priority=spec.priority,
            gpus=spec.resources.gpus,
            pool=spec.resources.pool or "",
            idempotency_key=idempotency_key,
        )
        _record(job, actor, kind=JobEvent.Kind.STATE, to_state=S.QUEUED, message="submitted")
        if env_version is not None:  # after the idempotency check: a retry is not a second use
            env_refs.resolver().usage_record(env_version)
        # Nudge the scheduler once this commits; beat runs it every few seconds anyway.
        enqueue("workers.schedule", expires=30)
        return job, True


def _record(
    job: Job,
    actor: Actor,
    *,
    kind: str,
    message: str = "",
    from_state: JobState | None = None,
    to_state: JobState | None = None,
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Append an event. The caller holds the job's row lock (or just created it)."""
    seq = job.next_event_seq
    Job.objects.filter(pk=job.pk).update(next_event_seq=seq + 1)
    job.next_event_seq = seq + 1
    event = JobEvent.objects.create(
        job=job,
        seq=seq,
        kind=kind,
        actor_user=actor.user,
        actor_token=actor.token,
        actor_label=actor.label,
        from_state=from_state.value if from_state else "",
        to_state=to_state.value if to_state else "",
        message=message[:2000],
        data=data or {},
    )
    # Live viewers (SSE) get every event as soon as it commits, whoever recorded it.
    live.publish_event_on_commit(event)
    return event


def job_event_add(
    *, job: Job, actor: Actor, kind: str, message: str, data: dict[str, Any] | None = None
) -> JobEvent:
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        return _record(job, actor, kind=kind, message=message, data=data)


def job_transition(
    *, job: Job, to: JobState, actor: Actor, reason: str = "", data: dict[str, Any] | None = None
) -> Job:
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        return _transition_locked(locked, to, actor, reason, data)


def _transition_locked(
    job: Job, to: JobState, actor: Actor, reason: str, data: dict[str, Any] | None = None
) -> Job:
    current = JobState(job.state)
    if to not in TRANSITIONS[current]:
        raise Conflict(f"a {current.value} job cannot become {to.value}")
    now = timezone.now()
    job.state = to.value
    job.state_reason = reason[:MAX_REASON]
    if to is S.RUNNING:
        job.started_at = job.started_at or now
    if to is S.QUEUED:
        job.attempt += 1
    if to in TERMINAL_STATES:
        job.finished_at = now
    job.save(update_fields=["state", "state_reason", "started_at", "attempt", "finished_at", "updated_at"])
    _record(job, actor, kind=JobEvent.Kind.STATE, from_state=current, to_state=to, message=reason, data=data)
    return job


def job_cancel(*, job: Job, actor: Actor, reason: str = "") -> Job:
    """Cancel now if the job has not started; otherwise ask the runtime to stop at its next step boundary."""
    reason = reason.strip()[:MAX_REASON] or f"cancelled by {actor.label}"
    with transaction.atomic():
        # Decide under the row lock: the scheduler may be admitting or starting this job right now.
        job = Job.objects.select_for_update().get(pk=job.pk)
        state = JobState(job.state)
        if state is S.CANCELLING:
            return job  # already asked: cancelling twice is not an error
        if state in TERMINAL_STATES:
            raise Conflict(f"the job already finished ({state.value})")
        target = S.CANCELLING if state is S.RUNNING else S.CANCELLED
        return _transition_locked(job, target, actor, reason)


PRIORITY_MIN, PRIORITY_MAX = -10, 10  # the JobSpec's bounds


def job_set_priority(*, job: Job, priority: int, actor: Actor, reason: str = "") -> Job:
    """Re-prioritize a job that has not finished (platform admin). Priority orders jobs within their
    organization's own queue; the spec keeps the same value so a re-queued attempt sees it too."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise DomainError("priority must be an integer", field="priority")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise DomainError(f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}", field="priority")
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        if JobState(job.state) in TERMINAL_STATES:
            raise Conflict(f"the job already finished ({job.state})")
        if job.priority == priority:
            return job
        old = job.priority
        job.priority = priority
        job.spec = {**job.spec, "priority": priority}
        job.save(update_fields=["priority", "spec", "updated_at"])
        message = f"priority changed from {old} to {priority} by {actor.label}"
        if reason.strip():
            message += f": {reason.strip()[:MAX_REASON]}"
        _record(job, actor, kind=JobEvent.Kind.INFO, message=message, data={"priority": [old, priority]})
        audit_record(
            AuditAction.JOB_PRIORITY_CHANGED,
            organization=job.organization,
            user=actor.user,
            target=("job", job.pk, job.name),
            details={"from": old, "to": priority, "reason": reason.strip()[:MAX_REASON]},
        )
    enqueue("workers.schedule", expires=30)
    return job
