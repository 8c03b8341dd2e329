"""Runtime ingest API: how a running job reports back. THE CONTRACT between the platform and `gpu_runtime`.

Launch. The driver gives the runtime (portal.services.job_tokens.job_runtime_env):
    OPENTINKER_INGEST_URL = <base>/api/v1/ingest/jobs/<job id>
    OPENTINKER_JOB_TOKEN  = otj_<job id>.<attempt>.<expiry>.<signature>
(on a Ray pool, OPENTINKER_BOOTSTRAP_TOKEN instead: redeem it once with ``POST .../bootstrap`` for the job
token and the environment secret first, api/views/ingest_bootstrap.py).
Every request: ``POST {OPENTINKER_INGEST_URL}/<endpoint>``, ``Authorization: Bearer {OPENTINKER_JOB_TOKEN}``,
``Content-Type: application/json``, a body of at most API_MAX_BODY_BYTES (256 KiB by default: send metric
points in batches of at most 5,000 AND about 200 KiB of JSON).

    /metrics     {"points": [{"step": int >= 0, "name": str (1-100 chars), "value": finite number}, ...]}
                 1-5,000 points -> 200 {"received": n, "inserted": m}. Idempotent on (job, name, step): a
                 point already stored is ignored (first value wins), so retry a failed batch as-is and
                 re-send freely after a resume. NaN / Infinity / non-numbers -> 400 naming the point
                 (points.<i>.value).
    /events      {"kind": "info" | "warning" | "error", "message": str (<= 2000), "data": {...} (optional)}
                 -> 201 {"seq": n}. Not idempotent: do not retry blindly after a timeout.
    /logs        {"lines": [{"line": str, "stream": "stdout" | "stderr" (default stdout)}, ...]}
                 1-1,000 lines, a line over 4,000 characters is cut -> 201 {"first_seq": a, "last_seq": b}.
    /checkpoints {"step": int, "uri": str, "files": [{"name": str, "size": int, "sha256": 64 hex}, ...]}
                 uri must lie inside the job's own prefix ``<organization prefix>/jobs/<job id>/`` (else 400);
                 names are relative to uri. 201 (new step) / 200 (same step again: replaced)
                 -> {"id", "step", "uri", "size_bytes"}. Write the files first, then record them.
    /rollouts    {"step": int, "episodes": [...]}: a step's recorded episodes (api/views/rollouts.py).
                 Idempotent on (job, step): the step again replaces it -> 201 (new) / 200 (replaced).
    /heartbeat   {} or {"step": int}  -> 200 {"cancel": bool, "state": str}. Send every ~10-30 s; the reaper
                 re-queues a running job whose heartbeats stop. cancel=true: stop at the next step boundary,
                 save a checkpoint if the spec asks, then report "cancelled" (or the job's final state).
    /state       {"state": "running" | "succeeded" | "failed" | "cancelled", "reason": str (optional)}
                 -> 200 {"cancel": bool, "state": str}. Report "running" once started; a final state last,
                 after every metric/checkpoint was accepted. Repeating the current state is a no-op.

And one read: ``GET {OPENTINKER_INGEST_URL}/environment`` -> the job's pinned environment package archive
(application/gzip, sha256 in ``X-Checksum-Sha256``; check it against ``environment.sha256`` of the spec);
404 when the job's environment is a built-in or remote one (api/views/ingest_env.py).

Answers the runtime must act on:
    401  token invalid, expired, or of an earlier attempt (the job was re-queued): stop, report nothing more.
    404  the URL names another job than the token's.
    409  the job no longer takes writes (it finished, or moved on to another attempt): stop.
    413  body too large: split the batch.   429  slow down (Retry-After).   5xx / connection error: retry
    with backoff (metrics, logs, heartbeat and state are safe to retry).
Errors have the API's one shape: {"error": {"code", "message", "fields": {"dotted.path": [messages]}}}.

Every accepted write is published to the job's live feed (SSE, api/views/stream.py) after it commits.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from api.ingest_auth import JobIngestThrottle, JobTokenAuthentication, JobTokenForThisJob
from api.serializers import ErrorSerializer, StrictSerializer
from opentinker.spec import JobState
from portal.services import ingest
from portal.services.jobs import MAX_REASON


class IngestApi(APIView):
    authentication_classes = [JobTokenAuthentication]
    permission_classes = [JobTokenForThisJob]
    throttle_classes = [JobIngestThrottle]

    def job(self, request):
        return request.auth.job


def ingest_body(request) -> dict:
    """The request's parsed JSON body, which must be an object (a list or a scalar is a 400 naming ``body``)
    before any serializer sees it. Shared by every ingest endpoint."""
    if not isinstance(request.data, dict):
        raise serializers.ValidationError({"body": ["expected a JSON object"]})
    return request.data


# --- metrics ---


class MetricPointSerializer(serializers.Serializer):
    step = serializers.IntegerField(min_value=0, max_value=ingest.MAX_STEP)
    name = serializers.CharField(max_length=ingest.MAX_NAME)
    value = serializers.FloatField(help_text="A finite number: NaN and infinities are refused.")


class IngestMetricsInput(serializers.Serializer):
    # Documents the body; ingest.metric_points_validate checks it (the same rules, much faster for 5,000).
    points = MetricPointSerializer(many=True, max_length=ingest.MAX_POINTS, min_length=1)


class IngestMetricsOutput(serializers.Serializer):
    received = serializers.IntegerField()
    inserted = serializers.IntegerField(help_text="Points new to the job; the rest were stored before.")


class IngestMetricsApi(IngestApi):
    @extend_schema(
        operation_id="ingest_metrics",
        request=IngestMetricsInput,
        responses={200: IngestMetricsOutput, 409: ErrorSerializer},
        description="A batch of metric points. Idempotent on (job, name, step): re-sent points are ignored.",
    )
    def post(self, request, job_id):
        body = ingest_body(request)
        unknown = sorted(set(body) - {"points"})
        if unknown:
            raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
        received, inserted = ingest.metrics_ingest(job=self.job(request), points=body.get("points"))
        return Response({"received": received, "inserted": inserted})


# --- events ---


class IngestEventInput(StrictSerializer):
    kind = serializers.ChoiceField(choices=list(ingest.EVENT_KINDS))
    message = serializers.CharField(max_length=2000, allow_blank=True)
    data = serializers.DictField(required=False, default=dict)


class IngestEventOutput(serializers.Serializer):
    seq = serializers.IntegerField()


class IngestEventsApi(IngestApi):
    @extend_schema(
        operation_id="ingest_events",
        request=IngestEventInput,
        responses={201: IngestEventOutput, 409: ErrorSerializer},
    )
    def post(self, request, job_id):
        s = IngestEventInput(data=ingest_body(request))
        s.is_valid(raise_exception=True)
        event = ingest.event_ingest(job=self.job(request), **s.validated_data)
        return Response({"seq": event.seq}, status=status.HTTP_201_CREATED)


# --- logs ---


class LogLineSerializer(StrictSerializer):
    line = serializers.CharField(allow_blank=True, trim_whitespace=False)
    stream = serializers.ChoiceField(choices=list(ingest.LOG_STREAMS), default="stdout")


class IngestLogsInput(StrictSerializer):
    lines = LogLineSerializer(many=True, min_length=1, max_length=ingest.MAX_LINES)


class IngestLogsOutput(serializers.Serializer):
    first_seq = serializers.IntegerField()
    last_seq = serializers.IntegerField()


class IngestLogsApi(IngestApi):
    @extend_schema(
        operation_id="ingest_logs",
        request=IngestLogsInput,
        responses={201: IngestLogsOutput, 409: ErrorSerializer},
        description="Log lines, numbered in order per job; a line over "
        f"{ingest.MAX_LINE_CHARS} characters is cut.",
    )
    def post(self, request, job_id):
        s = IngestLogsInput(data=ingest_body(request))
        s.is_valid(raise_exception=True)
        rows = ingest.logs_ingest(job=self.job(request), lines=s.validated_data["lines"])
        return Response({"first_seq": rows[0].seq, "last_seq": rows[-1].seq}, status=status.HTTP_201_CREATED)


# --- checkpoints ---


class CheckpointFileInput(StrictSerializer):
    name = serializers.CharField(max_length=500)
    size = serializers.IntegerField(min_value=0)
    sha256 = serializers.CharField(min_length=64, max_length=64)


class IngestCheckpointInput(StrictSerializer):
    step = serializers.IntegerField(min_value=0, max_value=ingest.MAX_STEP)
    uri = serializers.CharField(max_length=1024, help_text="Inside <organization prefix>/jobs/<job id>/.")
    files = CheckpointFileInput(many=True, min_length=1, max_length=ingest.MAX_FILES)


class IngestCheckpointOutput(serializers.Serializer):
    id = serializers.IntegerField()
    step = serializers.IntegerField()
    uri = serializers.CharField()
    size_bytes = serializers.IntegerField()


class IngestCheckpointsApi(IngestApi):
    @extend_schema(
        operation_id="ingest_checkpoints",
        request=IngestCheckpointInput,
        responses={200: IngestCheckpointOutput, 201: IngestCheckpointOutput, 409: ErrorSerializer},
        description="Record a checkpoint whose files are already in object storage (201; 200 when the step "
        "was recorded before and is replaced).",
    )
    def post(self, request, job_id):
        s = IngestCheckpointInput(data=ingest_body(request))
        s.is_valid(raise_exception=True)
        checkpoint, created = ingest.checkpoint_record(job=self.job(request), **s.validated_data)
        body = {
            "id": checkpoint.pk,
            "step": checkpoint.step,
            "uri": checkpoint.uri,
            "size_bytes": checkpoint.size_bytes,
        }
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


# --- heartbeat and state ---


class IngestHeartbeatInput(StrictSerializer):
    step = serializers.IntegerField(min_value=0, required=False, help_text="Informational.")


class IngestControlOutput(serializers.Serializer):
    cancel = serializers.BooleanField(help_text="Stop at the next step boundary.")
    state = serializers.ChoiceField(choices=[s.value for s in JobState])


class IngestHeartbeatApi(IngestApi):
    @extend_schema(
        operation_id="ingest_heartbeat",
        request=IngestHeartbeatInput,
        responses={200: IngestControlOutput, 409: ErrorSerializer},
        description="The runtime is alive; the answer carries the cancel flag.",
    )
    def post(self, request, job_id):
        IngestHeartbeatInput(data=ingest_body(request)).is_valid(raise_exception=True)
        cancel, state = ingest.heartbeat_record(job=self.job(request))
        return Response({"cancel": cancel, "state": state})


RUNTIME_STATE_VALUES = [s.value for s in ingest.RUNTIME_STATES]


# A pattern, not an enum, in the schema: drf-spectacular would name this enum after the field ("state"), which
# the full set of job states already uses.
@extend_schema_field(
    {
        "type": "string",
        "pattern": f"^({'|'.join(RUNTIME_STATE_VALUES)})$",
        "description": f"One of: {', '.join(RUNTIME_STATE_VALUES)}.",
    }
)
class RuntimeStateField(serializers.ChoiceField):
    pass


class IngestStateInput(StrictSerializer):
    state = RuntimeStateField(choices=RUNTIME_STATE_VALUES)
    reason = serializers.CharField(max_length=MAX_REASON, required=False, allow_blank=True, default="")


class IngestStateApi(IngestApi):
    @extend_schema(
        operation_id="ingest_state",
        request=IngestStateInput,
        responses={200: IngestControlOutput, 409: ErrorSerializer},
        description="The runtime started (running) or finished (succeeded, failed, cancelled).",
    )
    def post(self, request, job_id):
        s = IngestStateInput(data=ingest_body(request))
        s.is_valid(raise_exception=True)
        cancel, state = ingest.state_report(
            job=self.job(request),
            state=JobState(s.validated_data["state"]),
            reason=s.validated_data["reason"],
        )
        return Response({"cancel": cancel, "state": state})
