"""Bootstrap tokens: how a job on a shared cluster gets its secrets without them sitting in its job API.

A Ray job's ``runtime_env`` is readable by anyone who can reach that cluster's Job API (``ray job list``
shows it, for as long as the cluster keeps the job). So the Ray driver puts no secret there: only a
bootstrap token, ``otb_<random>``, that the runtime redeems once, at start, over the ingest API
(``POST {OPENTINKER_INGEST_URL}/bootstrap``) for the job token and the environment secret. What stays
readable afterwards is a spent token.

- single use: redeeming blanks the stored hash in the same UPDATE that checks it, so of two racing redeems
  one wins; a second redeem (or a copy read from the job API) gets 401, and the real runtime, finding its
  token already spent, fails loudly instead of running with someone else holding its credentials;
- short-lived: ``OPENTINKER_BOOTSTRAP_TTL_S`` (default 600 s: time for the cluster to set up the job's
  environment and start it), and only while its allocation is live and the job is on that attempt;
- stored as a keyed hash (HMAC with the pepper), one per allocation: issuing again replaces it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from portal.models import MODEL_SERVER_KIND, Allocation, Job
from portal.services.env_secrets import environment_secret_reveal
from portal.services.job_tokens import job_token_issue
from portal.services.model_servers import model_server_env
from portal.services.secrets import secret_hash

PREFIX = "otb_"
BOOTSTRAP_VAR = "OPENTINKER_BOOTSTRAP_TOKEN"
MAX_LENGTH = 100
_FORMAT = re.compile(r"otb_[A-Za-z0-9_-]{43}")


def bootstrap_ttl_s() -> int:
    # Finite (settings.py refuses inf): a credential that never expires is what this module exists to avoid.
    return int(settings.OPENTINKER_BOOTSTRAP_TTL_S)


def bootstrap_issue(alloc: Allocation, ttl_s: int | None = None) -> str:
    """A fresh bootstrap token for this allocation (the one before it, if any, stops working)."""
    raw = PREFIX + secrets.token_urlsafe(32)
    expires = timezone.now() + timedelta(seconds=bootstrap_ttl_s() if ttl_s is None else ttl_s)
    Allocation.objects.filter(pk=alloc.pk).update(
        bootstrap_digest=secret_hash(raw), bootstrap_expires_at=expires
    )
    return raw


@dataclass(frozen=True)
class Bootstrap:
    job: Job
    job_token: str
    environment_secret: str | None
    # A Tinker model server's secrets (portal/services/model_servers.py `model_server_env`): its model-server
    # token and the Valkey URL of its queue; None for other jobs.
    model_server: dict[str, str] | None = None


def bootstrap_redeem(raw: str, job_id) -> Bootstrap | None:
    """The job's secrets for a valid, unexpired, unused token of that job's live allocation; None otherwise
    (and the token is spent either way if it matched). Raises EnvironmentSecretMissing when the job's
    environment secret was deleted since submission."""
    if not isinstance(raw, str) or len(raw) > MAX_LENGTH or not _FORMAT.fullmatch(raw):
        return None
    digest = secret_hash(raw)
    with transaction.atomic():
        alloc = (
            Allocation.objects.select_for_update()
            .select_related("job", "job__organization")
            .filter(bootstrap_digest=digest, job_id=job_id)
            .first()
        )
        if alloc is None:
            return None
        Allocation.objects.filter(pk=alloc.pk).update(bootstrap_digest="")  # spent, whatever follows
        job = alloc.job
        if (
            alloc.released_at is not None
            or alloc.bootstrap_expires_at is None
            or alloc.bootstrap_expires_at <= timezone.now()
            or job.attempt != alloc.attempt
        ):
            return None
    secret_name = (job.spec.get("environment") or {}).get("secret")
    value = None
    if secret_name:
        value = environment_secret_reveal(job.organization, secret_name)
    extra = None
    if job.kind == MODEL_SERVER_KIND:
        env = model_server_env(job)
        extra = {
            "model_server_token": env["OPENTINKER_MODEL_SERVER_TOKEN"],
            "queue_url": env["OPENTINKER_QUEUE_URL"],
        }
    return Bootstrap(job=job, job_token=job_token_issue(job), environment_secret=value, model_server=extra)
