"""``/livez`` (also ``/healthz``) and ``/readyz``: liveness and readiness for probes and load balancers.

Public (no credentials, no throttle) and outside ``/api/v1``. Liveness answers 200 as long as the process
serves requests and checks nothing else, so a restart is never triggered by a dependency's outage.
Readiness checks PostgreSQL, Valkey, object storage and that Celery beat and a worker were seen recently
(portal/health.py): 200 with every check, or 503 with the same checks and, in the API's error shape, the
reason of each one that failed.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from api.serializers import ErrorDetailSerializer
from portal import health


class LivenessSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok"])


class CheckSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    detail = serializers.CharField(help_text="What was seen; the reason when not ok.")


class ChecksSerializer(serializers.Serializer):
    database = CheckSerializer(help_text="PostgreSQL answers.")
    valkey = CheckSerializer(help_text="Valkey (broker, cache, live events) answers.")
    beat = CheckSerializer(help_text="Celery beat published a periodic task recently.")
    worker = CheckSerializer(help_text="A Celery worker finished a task recently.")
    object_store = CheckSerializer(help_text="The object store (file:// or s3://) is usable.")


class ReadySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ready"])
    checks = ChecksSerializer()


class NotReadySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["not_ready"])
    checks = ChecksSerializer()
    error = ErrorDetailSerializer(
        help_text='code "not_ready"; fields: the reason of each failing check, by check name.'
    )


class PublicProbe(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes: list = []


class LivenessApi(PublicProbe):
    @extend_schema(
        operation_id="livez",
        auth=[],
        responses={200: LivenessSerializer},
        description="Liveness: the process serves requests. Checks nothing else (`/healthz` is the same).",
        tags=["health"],
    )
    def get(self, request):
        return Response({"status": "ok"})


class HealthzApi(LivenessApi):
    @extend_schema(
        operation_id="healthz",
        auth=[],
        responses={200: LivenessSerializer},
        description="Liveness under its first name: the same as `/livez`.",
        tags=["health"],
    )
    def get(self, request):
        return super().get(request)


class ReadinessApi(PublicProbe):
    @extend_schema(
        operation_id="readyz",
        auth=[],
        responses={
            200: ReadySerializer,
            503: OpenApiResponse(
                NotReadySerializer,
                description="Not ready: the failing checks' reasons.",
                examples=[
                    OpenApiExample(
                        "Valkey down",
                        status_codes=["503"],
                        value={
                            "status": "not_ready",
                            "checks": {"valkey": {"ok": False, "detail": "Valkey unreachable: ..."}},
                            "error": {
                                "code": "not_ready",
                                "message": "not ready: valkey, beat, worker",
                                "fields": {"valkey": ["Valkey unreachable: ..."]},
                            },
                        },
                    )
                ],
            ),
        },
        description="Readiness: PostgreSQL, Valkey and the object store answer, and Celery beat and a "
        "worker were seen within HEALTH_MAX_SILENCE_S (60 s by default).",
        tags=["health"],
    )
    def get(self, request):
        ready, checks = health.readiness()
        body = {
            "status": "ready" if ready else "not_ready",
            "checks": {n: c.as_dict() for n, c in checks.items()},
        }
        if ready:
            return Response(body, headers={"Cache-Control": "no-store"})
        failing = {name: [c.detail] for name, c in checks.items() if not c.ok}
        body["error"] = {
            "code": "not_ready",
            "message": f"not ready: {', '.join(failing)}",
            "fields": failing,
        }
        return Response(body, status=503, headers={"Cache-Control": "no-store"})
