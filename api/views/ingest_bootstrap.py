"""`POST /api/v1/ingest/jobs/<id>/bootstrap`: a runtime trades its single-use bootstrap token for its secrets.

Part of the ingest contract (api/views/ingest.py), for runtimes started where their environment is readable
by others (a Ray job's ``runtime_env``): the driver gives them ``OPENTINKER_BOOTSTRAP_TOKEN`` instead of the
job token and the environment secret (portal/services/job_bootstrap.py). ``Authorization: Bearer otb_...``,
an empty body -> 200 ``{"job_token": "otj_...", "environment_secret": str | null}`` (a Tinker model server's
job also gets ``model_server_token`` and ``queue_url``), ``Cache-Control:
no-store``. The token works once, before it expires, for its own job's live attempt: anything else is a 401
(the runtime stops). 409 when the job's environment secret was deleted since submission.
"""

from __future__ import annotations

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle
from rest_framework.views import APIView

from api.serializers import ErrorSerializer
from portal.errors import Conflict
from portal.services.env_secrets import EnvironmentSecretMissing
from portal.services.job_bootstrap import MAX_LENGTH, PREFIX, bootstrap_redeem

INVALID = "invalid, expired or already used bootstrap token"


class BootstrapOutput(serializers.Serializer):
    job_token = serializers.CharField(help_text="The job token for every other ingest call of this attempt.")
    environment_secret = serializers.CharField(
        allow_null=True, help_text="The job's environment secret (OPENTINKER_ENV_SECRET), or null."
    )
    model_server_token = serializers.CharField(
        required=False, help_text="A Tinker model-server job only: its base model's model-server token."
    )
    queue_url = serializers.CharField(
        required=False, help_text="A Tinker model-server job only: the Valkey URL of its operations queue."
    )


class BootstrapThrottle(AnonRateThrottle):
    scope = "ingest_bootstrap"

    def get_rate(self) -> str:
        return "60/min"  # per client address: a runtime redeems once; guessing a 256-bit token is hopeless


class IngestBootstrapApi(APIView):
    authentication_classes: list = []  # the bootstrap token is checked here, by bootstrap_redeem
    permission_classes = [AllowAny]
    throttle_classes = [BootstrapThrottle]

    @extend_schema(
        operation_id="ingest_bootstrap",
        request=None,
        responses={200: BootstrapOutput, **{code: ErrorSerializer for code in (401, 409, 429)}},
        description="Redeem the single-use bootstrap token (Authorization: Bearer otb_...) for the job "
        "token and the environment secret.",
    )
    def post(self, request, job_id):
        scheme, _, raw = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw.startswith(PREFIX) or len(raw) > MAX_LENGTH:
            raise exceptions.AuthenticationFailed(INVALID)
        try:
            job = uuid.UUID(str(job_id))
        except ValueError:
            raise exceptions.AuthenticationFailed(INVALID) from None
        try:
            got = bootstrap_redeem(raw, job)
        except EnvironmentSecretMissing as e:
            raise Conflict(e.message) from None
        if got is None:
            raise exceptions.AuthenticationFailed(INVALID)
        body = {"job_token": got.job_token, "environment_secret": got.environment_secret}
        if got.model_server is not None:  # a Tinker model server's token and queue URL
            body.update(got.model_server)
        response = Response(body)
        response["Cache-Control"] = "no-store"
        return response

    def get_authenticate_header(self, request) -> str:
        return "Bearer"  # 401, not 403
