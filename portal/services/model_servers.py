"""Model servers of the Tinker API as scheduler-admitted jobs (issue 16): started on demand, supervised like
any job, ended when idle.

Why a job: capacity on a pool is held by an `Allocation`, which the scheduler gives to a `Job`; a model
server run as a job of kind `tinker` gets admission (quotas, fair share, pool placement), launch through the
pool's driver (a local process under `workers.runner`, a Ray job on a Ray pool), heartbeats, reaping, bounded
re-queues after a crash (`OPENTINKER_JOB_MAX_RETRIES`) and GPU-seconds accounting without a second path.

Who owns it: one model server per base model holds the adapters of every organization using that base, so
its capacity is the platform's, not any tenant's: the job belongs to the platform organization (`opentinker`,
`is_platform`), whose quota (set in the admin console) bounds how many model servers run at once and which
pools they may use. Each organization's use is metered per call instead (tokens and model-server seconds in
its UsageRecord, charged with each outcome: api/tinker/services.py `future_complete`).

The life of one:
1. A Tinker call is queued for a base model (api/tinker/queue.py) and no server holds the base's lease in
   Valkey: `model_server_ensure` creates the queued job unless one is live (a partial unique constraint makes
   two racing API workers create one). The supervisor pass (`model_servers_reconcile`) does the same for any
   base with operations waiting and no server, so a nudge lost at commit or an exit racing a new call never
   strands work. Calls wait in the queue meanwhile; the SDK's futures simply poll longer.
2. The scheduler admits it, the launcher starts `python -m gpu_runtime run spec.json` through the pool's
   driver with `model_server_env` (the model-server token, Valkey and the Tinker ingest URL); `"kind":
   "tinker"` in the spec makes the runtime a model server (gpu_runtime/model_server/serve.py `serve_spec`).
3. It exits 0 after `OPENTINKER_TINKER_IDLE_EXIT_S` without work (parking its training clients): the job
   succeeds and its allocation is released. Killed (or its node, runner or Ray cluster lost), it is re-queued
   as lost and started again only if something needs it (`model_server_demand`: operations queued, calls it
   had in flight, or a live session with a training client or sampler on its base); the new one waits for
   the dead one's lease, fails the calls that were in flight, and serves the rest. With nothing needing it,
   the job ends `succeeded` as after an idle exit (not `failed`, which would hold back the next start) and
   the next Tinker call starts a fresh server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import redis
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from opentinker.spec import JobState
from portal import storage
from portal.actors import Actor
from portal.models import MODEL_SERVER_KIND, Allocation, Job, JobEvent, Organization, Quota
from portal.models.jobs import LIVE_STATES
from portal.services.enqueue import enqueue
from portal.services.jobs import job_event_add
from portal.services.model_server_tokens import model_server_token_issue

log = logging.getLogger(__name__)
PLATFORM_ORG = "opentinker"
SPEC_VERSION = 1
ACTOR = Actor.system("tinker")
# The key names gpu_runtime/model_server/serve.py and api/tinker/queue.py use (neither can be imported here).
OPS_PREFIX = "tinker:ops:"
# After a base's model-server job failed, the next one is queued this long after at the earliest, doubled
# for each further failure of the last hour (a server failing at every start), at most FAILED_RETRY_MAX_S.
FAILED_RETRY_AFTER_S = 30.0
FAILED_RETRY_MAX_S = 1800.0
PLATFORM_GPU_HOURS = 10_000_000  # Quota.gpu_hours_per_month's maximum: no monthly bound
# A session is live while its heartbeat is this recent (the SDK beats every 10 s): its client may call again.
LIVE_SESSION_S = 60.0
VALKEY_TIMEOUT_S = 5.0  # a supervisor pass asking Valkey never hangs on it


def ops_key(base_model: str) -> str:
    return f"{OPS_PREFIX}{base_model}"


def claimed_key(base_model: str) -> str:
    return f"tinker:claimed:{base_model}"


def lease_key(base_model: str) -> str:
    return f"tinker:server:{base_model}"


def job_name(base_model: str) -> str:
    return f"model server {base_model}"[:100]


def platform_org() -> Organization:
    """The platform organization the model servers' capacity is charged to (created with the default quota
    if missing: an operator raises it in the admin console to run more model servers at once)."""
    org, _ = Organization.objects.get_or_create(
        slug=PLATFORM_ORG, defaults={"name": "OpenTinker", "is_platform": True}
    )
    # No monthly GPU-hours bound (a model server runs for days; tenants are metered per call), as migration
    # 0011 gives the quota env_registry's migration created.
    Quota.objects.get_or_create(
        organization=org, defaults={**settings.DEFAULT_QUOTA, "gpu_hours_per_month": PLATFORM_GPU_HOURS}
    )
    return org


def failed_retry_after_s(failures: int) -> float:
    """How long after a failed model-server job the next is queued, with `failures` in the last hour."""
    return min(FAILED_RETRY_AFTER_S * 2 ** max(failures - 1, 0), FAILED_RETRY_MAX_S)


def model_server_spec(base_model: str) -> dict[str, Any]:
    """What the runtime receives: not a JobSpec (the `kind` tells the runtime apart)."""
    return {
        "kind": MODEL_SERVER_KIND,
        "name": job_name(base_model),
        "model_server": {
            "base_model": base_model,
            "idle_exit_s": float(settings.OPENTINKER_TINKER_IDLE_EXIT_S),
            "lease_ttl_s": float(settings.OPENTINKER_TINKER_LEASE_TTL_S),
            "sampler": settings.OPENTINKER_TINKER_SAMPLER,
            # Parked training clients (idle exit, SIGTERM) of every organization: the platform's prefix.
            "spill_uri": f"{storage.organization_prefix(PLATFORM_ORG)}/tinker/spill",
        },
        "resources": {"gpus": settings.OPENTINKER_TINKER_SERVER_GPUS, "cpus": 1, "max_hours": 24 * 7},
    }


def live_server_job(base_model: str) -> Job | None:
    return Job.objects.filter(
        kind=MODEL_SERVER_KIND, name=job_name(base_model), state__in=[s.value for s in LIVE_STATES]
    ).first()


def model_server_ensure(base_model: str) -> tuple[Job, bool]:
    """The live model-server job of the base model, queued now if there is none; (job, created). Safe
    to call from any number of processes at once: the unique constraint lets one create it, the others find
    it. Within `failed_retry_after_s` of the base's last job failing (a server that crashed or cannot
    start) none is queued and that job is returned: such a server would otherwise be queued again at every
    call and supervisor pass, without end."""
    job = live_server_job(base_model)
    if job is not None:
        return job, False
    jobs = Job.objects.filter(kind=MODEL_SERVER_KIND, name=job_name(base_model))
    last = jobs.order_by("-created_at").first()
    if last is not None and last.state == JobState.FAILED.value and last.finished_at is not None:
        now = timezone.now()
        failures = jobs.filter(state=JobState.FAILED.value, finished_at__gte=now - timedelta(hours=1)).count()
        if (now - last.finished_at).total_seconds() < failed_retry_after_s(failures):
            return last, False
    org = platform_org()
    try:
        with transaction.atomic():
            spec = model_server_spec(base_model)
            job = Job.objects.create(
                organization=org,
                name=job_name(base_model),
                kind=MODEL_SERVER_KIND,
                state=JobState.QUEUED.value,
                spec=spec,
                spec_version=SPEC_VERSION,
                gpus=spec["resources"]["gpus"],
                pool=settings.OPENTINKER_TINKER_POOL,
            )
            job_event_add(
                job=job,
                actor=ACTOR,
                kind=JobEvent.Kind.STATE,
                message=f"a Tinker call for {base_model} found no model server: starting one",
            )
            enqueue("workers.schedule", expires=30)
    except IntegrityError:  # another process queued it first
        job = live_server_job(base_model)
        if job is None:  # ...and it already ended: ask again
            return model_server_ensure(base_model)
        return job, False
    log.info("queued model server job %s for %s", job.pk, base_model)
    return job, True


def model_server_env(job: Job) -> dict[str, str]:
    """What a driver adds to a model-server job's environment: where its queue and the Tinker ingest are,
    and the token that lets it complete futures of its base model only."""
    base = str(job.spec["model_server"]["base_model"])
    return {
        "OPENTINKER_MODEL_SERVER_TOKEN": model_server_token_issue(base),
        "OPENTINKER_QUEUE_URL": settings.REDIS_URL,
        "OPENTINKER_TINKER_INGEST_URL": f"{settings.INGEST_BASE_URL.rstrip('/')}/tinker/ingest/outcomes",
    }


def model_servers_reconcile(client: Any) -> list[str]:
    """The supervisor's pass: every base model with operations waiting in Valkey and no model server (no
    lease) gets one (`model_server_ensure`). Returns the bases it queued a server for."""
    if not settings.OPENTINKER_TINKER_AUTOSTART:
        return []
    started = []
    for raw in client.scan_iter(match=f"{OPS_PREFIX}*", count=100):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        base = key[len(OPS_PREFIX) :]
        if not base or not client.llen(key) or client.exists(lease_key(base)):
            continue
        _, created = model_server_ensure(base)
        if created:
            started.append(base)
    return started


# Whether a base model has a live session (heartbeating since the given time, not finished, with a training
# client or sampler on it). The Tinker API app owns sessions and registers this at start-up
# (api/tinker/apps.py): the domain cannot import it.
LiveSessions = Callable[[str, datetime], bool]
_live_sessions: LiveSessions | None = None


def register_live_sessions(check: LiveSessions) -> None:
    global _live_sessions
    _live_sessions = check


@cache
def _valkey(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=VALKEY_TIMEOUT_S, socket_connect_timeout=VALKEY_TIMEOUT_S)


def model_server_demand(base_model: str, client: Any = None) -> str:
    """Why the base model needs a model server now, or "" when nothing does: a lost server is restarted only
    then (`model_server_lost`). Unknown (Valkey not answering, no session check registered) counts as
    needed: a needless restart only idles out, a missing one strands calls."""
    client = client or _valkey(settings.REDIS_URL)
    try:
        if client.llen(ops_key(base_model)):
            return "operations are queued"
        if client.llen(claimed_key(base_model)):
            return "calls were in flight (the restarted server fails them clearly)"
    except redis.RedisError as exc:
        log.warning("model-server demand for %s: Valkey did not answer (%r)", base_model, exc)
        return "Valkey did not answer"
    if _live_sessions is None:
        return "live sessions unknown"
    try:
        # A savepoint: the caller (job_requeue) holds the job's row lock in its transaction, which a failed
        # query would otherwise abort, failing the whole requeue and the supervisor's pass with it.
        with transaction.atomic():
            live = _live_sessions(base_model, timezone.now() - timedelta(seconds=LIVE_SESSION_S))
    except Exception:
        log.exception("model-server demand for %s: the live-session check failed", base_model)
        return "live sessions unknown (the check failed)"
    return "a session is live" if live else ""


def model_server_lost_unneeded(job: Job) -> str:
    """For a lost model-server job: "" when it should be restarted (re-queued), else why it ends instead."""
    if job.kind != MODEL_SERVER_KIND:
        return ""
    base = str((job.spec.get("model_server") or {}).get("base_model") or "")
    if not base or model_server_demand(base):
        return ""
    return (
        f"not restarted: no Tinker call waits and no session is live for {base} "
        "(the next call starts a model server)"
    )


@dataclass(frozen=True)
class ServerAllocation:
    """The console's view of a base model's model-server job: its state, pool and times."""

    job_id: str
    state: str
    pool: str
    attempt: int
    admitted_at: datetime | None
    started_at: datetime | None
    released_at: datetime | None
    release_reason: str


def model_server_allocations(bases: list[str]) -> dict[str, ServerAllocation]:
    """Per base model, its live model-server job or else the last one, with its latest allocation."""
    names = {job_name(b): b for b in bases}
    out: dict[str, ServerAllocation] = {}
    jobs = Job.objects.filter(kind=MODEL_SERVER_KIND, name__in=list(names)).order_by("-created_at")
    for job in jobs:
        base = names[job.name]
        if base in out:
            continue
        alloc = Allocation.objects.filter(job=job).select_related("pool").order_by("-admitted_at").first()
        out[base] = ServerAllocation(
            job_id=str(job.pk),
            state=job.state,
            pool=alloc.pool.name if alloc else (job.pool or ""),
            attempt=job.attempt,
            admitted_at=alloc.admitted_at if alloc else None,
            started_at=alloc.launched_at if alloc else None,
            released_at=alloc.released_at if alloc else None,
            release_reason=alloc.release_reason if alloc else "",
        )
    return out
