"""Job tokens: what a job's runtime authenticates with when it reports to the ingest API.

``otj_<job uuid>.<attempt>.<expiry unix seconds>.<signature>``: stateless (no table) and signed with an
HMAC-SHA256 key derived from ``settings.TOKEN_PEPPER``. A token is good for ONE job and ONE attempt of it,
until its expiry:

- re-queueing the job (lost worker, preemption) increments ``Job.attempt``, which invalidates every token of
  the attempt before, so a zombie runtime of an earlier attempt can no longer write;
- a finished job still verifies (its runtime may ask for the cancel flag one last time), but the ingest
  services refuse its writes;
- user API tokens (``otk_``) are never accepted where job tokens are, and job tokens nowhere else.

The runtime never sees the pepper; the platform hands it the token with the ingest URL (``job_runtime_env``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid

from django.conf import settings

from portal.models import Job

PREFIX = "otj_"
MAX_LENGTH = 200
# Never shorter than this, whatever the spec says: a job must be able to finish its last step and report.
MIN_TTL_SECONDS = 3600
_FORMAT = re.compile(
    r"otj_(?P<job>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"\.(?P<attempt>\d{1,9})\.(?P<expiry>\d{1,12})\.(?P<sig>[A-Za-z0-9_-]{43})"
)


def _key(pepper: str | None = None) -> bytes:
    # A key of its own, derived from the pepper: a job-token signature can never double as an API-token hash.
    pepper = settings.TOKEN_PEPPER if pepper is None else pepper
    return hmac.new(pepper.encode(), b"opentinker job token v1", hashlib.sha256).digest()


def _sign(job_id: str, attempt: int, expiry: int, pepper: str | None = None) -> str:
    digest = hmac.new(_key(pepper), f"{job_id}.{attempt}.{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def default_ttl(job: Job) -> int:
    """The job's wall-clock limit plus an hour (the token dies with its attempt anyway)."""
    configured = settings.JOB_TOKEN_TTL_SECONDS
    if configured:
        return int(configured)
    try:
        hours = float(job.spec.get("resources", {}).get("max_hours", 1.0))
    except (AttributeError, TypeError, ValueError):
        hours = 1.0
    return max(MIN_TTL_SECONDS, int(hours * 3600) + 3600)


def job_token_issue(job: Job, ttl: int | None = None) -> str:
    """A token for the job's CURRENT attempt, valid ``ttl`` seconds (default: see ``default_ttl``)."""
    expiry = int(time.time()) + (default_ttl(job) if ttl is None else int(ttl))
    job_id = str(job.id)
    return f"{PREFIX}{job_id}.{job.attempt}.{expiry}.{_sign(job_id, job.attempt, expiry)}"


def job_token_verify(raw: str) -> Job | None:
    """The job the token speaks for, or None if it is malformed, forged, expired or of an older attempt."""
    if not isinstance(raw, str) or len(raw) > MAX_LENGTH:
        return None
    m = _FORMAT.fullmatch(raw)
    if m is None:
        return None
    job_id, attempt, expiry = m["job"], int(m["attempt"]), int(m["expiry"])
    # Check the signature before anything else, in constant time, and before touching the database. Signed
    # under the newest pepper; every live one is accepted, so adding a pepper leaves running jobs reporting.
    peppers = list(settings.TOKEN_PEPPERS.values())
    if not any([hmac.compare_digest(_sign(job_id, attempt, expiry, p), m["sig"]) for p in peppers]):
        return None
    if expiry <= time.time():
        return None
    job = Job.objects.select_related("organization").filter(pk=uuid.UUID(job_id)).first()
    if job is None or job.attempt != attempt:
        return None
    return job


def job_ingest_url(job: Job, base_url: str | None = None) -> str:
    """``OPENTINKER_INGEST_URL`` for the job: the runtime appends ``/metrics``, ``/events``, ... to it."""
    base = (base_url or settings.INGEST_BASE_URL).rstrip("/")
    return f"{base}/api/v1/ingest/jobs/{job.id}"


def job_runtime_env(job: Job, *, base_url: str | None = None, ttl: int | None = None) -> dict[str, str]:
    """What a driver puts in the runtime's environment so that it can report (see api/views/ingest.py)."""
    return {
        "OPENTINKER_INGEST_URL": job_ingest_url(job, base_url),
        "OPENTINKER_JOB_TOKEN": job_token_issue(job, ttl=ttl),
        "OPENTINKER_JOB_ID": str(job.id),
        "OPENTINKER_JOB_ATTEMPT": str(job.attempt),
    }
