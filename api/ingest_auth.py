"""`Authorization: Bearer otj_...` authentication for the runtime ingest API (``/api/v1/ingest/...``) only.

The ingest views use this class alone: a user's API token (``otk_``) or browser session gets 401 there,
and the rest of the API never accepts a job token (api.auth.ApiTokenAuthentication does not know it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.permissions import BasePermission
from rest_framework.throttling import SimpleRateThrottle

from portal.errors import NotFound
from portal.models import Job
from portal.observability import context
from portal.services.job_tokens import MAX_LENGTH, PREFIX, job_token_verify

INVALID = "invalid or expired job token"


@dataclass(frozen=True)
class JobPrincipal:
    """request.user for a job token: the job's runtime, no person."""

    job_id: uuid.UUID
    is_authenticated: bool = True
    is_active: bool = True
    is_staff: bool = False
    is_anonymous: bool = False

    @property
    def pk(self) -> str:
        return f"job:{self.job_id}"

    def get_username(self) -> str:
        return f"runtime of job {self.job_id}"


@dataclass(frozen=True)
class JobTokenAuth:
    job: Job


class JobTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw.startswith(PREFIX) or len(raw) > MAX_LENGTH:
            # Anything else (a user's otk_ token included) is refused outright, never passed on.
            raise exceptions.AuthenticationFailed(INVALID)
        job = job_token_verify(raw)
        if job is None:
            raise exceptions.AuthenticationFailed(INVALID)
        context.bind(org_id=job.organization_id, job_id=job.pk)  # on this request's log lines
        return JobPrincipal(job.pk), JobTokenAuth(job)

    def authenticate_header(self, request) -> str:
        return self.keyword  # 401, not 403, without credentials


class JobTokenForThisJob(BasePermission):
    """The job in the URL must be the token's job; any other id is a 404, as for a job that does not exist."""

    def has_permission(self, request, view) -> bool:
        auth = request.auth
        if not isinstance(auth, JobTokenAuth):
            return False
        try:
            wanted = uuid.UUID(str(view.kwargs.get("job_id", "")))
        except ValueError:
            raise NotFound("no such job") from None
        if wanted != auth.job.pk:
            raise NotFound("no such job")
        return True


class JobIngestThrottle(SimpleRateThrottle):
    """Per job, generous: guards against a runtime stuck in a retry loop, not against normal reporting."""

    scope = "ingest"

    def get_rate(self) -> str:
        return settings.INGEST_RATE_LIMIT

    def get_cache_key(self, request, view) -> str | None:
        auth = request.auth
        return f"throttle_ingest_{auth.job.pk}" if isinstance(auth, JobTokenAuth) else None


class JobTokenScheme(OpenApiAuthenticationExtension):
    target_class = "api.ingest_auth.JobTokenAuthentication"
    name = "JobToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "otj_<job id>.<attempt>.<expiry>.<signature>",
            "description": "A job token, given to a job's runtime at launch; valid only on "
            "/api/v1/ingest/jobs/{that job}/... and only for the job's current attempt.",
        }
