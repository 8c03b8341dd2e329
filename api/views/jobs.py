"""Jobs: submit, list, detail, cancel, metrics, events, checkpoints and their files."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import orjson
import pydantic
from django.db import connection
from django.http import FileResponse, HttpResponseRedirect
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import PageFilter, Pagination, page_response, query_filters
from api.errors import SpecInvalid
from api.schema import paginated
from api.serializers import ErrorSerializer, StrictSerializer
from api.tenancy import tenant_of
from opentinker.spec import JobKind, JobSpec, JobState
from portal import storage
from portal.actors import Actor
from portal.errors import NotFound
from portal.models import Job, Scope
from portal.selectors.jobs import (
    checkpoint_get,
    checkpoint_list,
    event_list,
    job_get,
    job_list,
    job_list_version,
    metric_series,
)
from portal.services.jobs import MAX_IDEMPOTENCY_KEY, job_cancel, job_submit


def actor_of(request) -> Actor:
    return Actor.for_request(request.user, tenant_of(request).token)


class JobOutputSerializer(serializers.ModelSerializer):
    organization = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    kind = serializers.ChoiceField(choices=[k.value for k in JobKind])
    state = serializers.ChoiceField(choices=[s.value for s in JobState])
    spec = serializers.JSONField()
    pool = serializers.CharField(allow_null=True)

    class Meta:
        model = Job
        fields = [
            "id",
            "name",
            "kind",
            "state",
            "state_reason",
            "spec",
            "organization",
            "created_by",
            "priority",
            "gpus",
            "pool",
            "attempt",
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def to_representation(self, instance):
        # Written out field by field: DRF's generic path builds the fields from the model on every request
        # and walks them per row, most of a list page's CPU. The same dict as `generic_representation`
        # (tests/api/test_api_rendering.py compares them); a new field goes into both.
        job = instance
        created_by = job.created_by
        return {
            "id": str(job.id),
            "name": job.name,
            "kind": job.kind,
            "state": job.state,
            "state_reason": job.state_reason,
            "spec": job.spec,
            "organization": job.organization.slug,
            "created_by": None if created_by is None else created_by.username,
            "priority": job.priority,
            "gpus": job.gpus,
            "pool": job.pool or None,
            "attempt": job.attempt,
            "created_at": _datetime(job.created_at),
            "updated_at": _datetime(job.updated_at),
            "started_at": _datetime(job.started_at),
            "finished_at": _datetime(job.finished_at),
        }

    def generic_representation(self, instance):
        """What DRF's ModelSerializer makes of `instance` from the declared fields (the reference)."""
        data = super().to_representation(instance)
        data["pool"] = data["pool"] or None
        return data


_DATETIME = serializers.DateTimeField()


def _datetime(value):
    return None if value is None else _DATETIME.to_representation(value)


# Pages of unfiltered job lists, serialized, by (organization id, limit, offset, count, version): a page is
# the same for every member allowed to list jobs, and the version (job_list_version) changes with any write
# to what the page shows, so a hit is the page the database holds now. Per process, least recently used out.
# Bounded in bytes too (a page's JSON): a spec's environment config is free-form up to the request body
# limit, so 200 jobs can make a page of ~50 MB, and MAX_PAGES of those would exhaust a web process's memory.
_PAGES: OrderedDict[tuple, tuple[list, int]] = OrderedDict()
_PAGES_LOCK = threading.Lock()
MAX_PAGES = 64  # at most 200 jobs a page, ~1.5 kB each with a usual spec
MAX_PAGE_BYTES = 16 * 1024 * 1024  # the stored pages' JSON together (a few times that in objects)


def _unfiltered_page(view, request, organization) -> Response:
    """The list without filters: one query (the count and version) when the page is stored, two otherwise."""
    paginator = Pagination()
    paginator.request = request
    paginator.limit, paginator.offset = paginator.get_limit(request), paginator.get_offset(request)
    paginator.count, version = job_list_version(organization)
    key = (organization.pk, paginator.limit, paginator.offset, paginator.count, version)
    with _PAGES_LOCK:
        stored = _PAGES.get(key) if version is not None else None
        if stored is not None:
            _PAGES.move_to_end(key)
    if stored is not None:
        return paginator.get_paginated_response(stored[0])
    page = job_list(organization)[paginator.offset : paginator.offset + paginator.limit]
    results = list(JobOutputSerializer(page, many=True).data)
    if version is None:  # too many jobs to version (VERSIONED_MAX_JOBS): the page and the count read, no more
        return paginator.get_paginated_response(results)
    try:
        size = len(orjson.dumps(results))
    except orjson.JSONEncodeError:  # only DRF's encoder writes it (api/renderers.py): not measured, not kept
        size = MAX_PAGE_BYTES + 1
    if size <= MAX_PAGE_BYTES:
        _store(key, results, size)
    return paginator.get_paginated_response(results)


def _store(key: tuple, results: list, size: int) -> None:
    with _PAGES_LOCK:
        _PAGES.pop(key, None)
        _PAGES[key] = (results, size)
        total = sum(stored_size for _, stored_size in _PAGES.values())  # at most MAX_PAGES + 1 of them
        while len(_PAGES) > MAX_PAGES or total > MAX_PAGE_BYTES:
            total -= _PAGES.popitem(last=False)[1][1]


class JobListApi(APIView):
    read_scope = Scope.JOBS_READ
    write_scope = Scope.JOBS_WRITE

    class JobListFilter(PageFilter):
        state = serializers.MultipleChoiceField(choices=[s.value for s in JobState], required=False)
        kind = serializers.ChoiceField(choices=[k.value for k in JobKind], required=False)
        name = serializers.CharField(required=False, max_length=100)

    @extend_schema(
        operation_id="jobs_list",
        parameters=[JobListFilter],
        responses={200: paginated(JobOutputSerializer)},
    )
    def get(self, request):
        tenant = tenant_of(request)
        d = query_filters(request, self.JobListFilter, multi=("state",))
        # Outside a transaction only: inside one, a later write of the same transaction keeps the row
        # versions (one transaction id) that a page stored earlier in it was filed under.
        if not (d.keys() - {"limit", "offset"}) and not connection.in_atomic_block:
            return _unfiltered_page(self, request, tenant.organization)
        qs = job_list(
            tenant.organization,
            state=sorted(d.get("state", [])) or None,
            kind=d.get("kind"),
            name=d.get("name"),
        )
        return page_response(self, request, qs, JobOutputSerializer, counted=True)

    @extend_schema(
        operation_id="jobs_submit",
        request=JobSpec,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                description="Retrying with the same key returns the job the first request created (200).",
            )
        ],
        responses={
            200: JobOutputSerializer,
            201: JobOutputSerializer,
            404: ErrorSerializer,
            409: ErrorSerializer,
        },
        description="Submit a job; the body is a JobSpec. Nothing is stored unless the whole spec is valid "
        "and within the organization's quota (429 when the queue limit is reached).",
    )
    def post(self, request):
        tenant = tenant_of(request)
        if not isinstance(request.data, dict):
            raise serializers.ValidationError({"body": ["expected a JSON object (a JobSpec)"]})
        try:
            # Strict JSON validation: `true`, `1.5` or `"2"` for an integer field is an error, not a guess.
            spec = JobSpec.model_validate_json(json.dumps(request.data), strict=True)
        except pydantic.ValidationError as e:
            raise SpecInvalid(e) from None
        key = request.headers.get("Idempotency-Key", "")
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise serializers.ValidationError(
                {"Idempotency-Key": [f"at most {MAX_IDEMPOTENCY_KEY} characters"]}
            )
        job, created = job_submit(
            organization=tenant.organization, actor=actor_of(request), spec=spec, idempotency_key=key
        )
        return Response(
            JobOutputSerializer(job).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class JobDetailApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(operation_id="jobs_get", responses={200: JobOutputSerializer})
    def get(self, request, job_id):
        job = job_get(tenant_of(request).organization, job_id)
        return Response(JobOutputSerializer(job).data)


class JobCancelApi(APIView):
    write_scope = Scope.JOBS_WRITE

    class JobCancelInput(StrictSerializer):
        reason = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")

    @extend_schema(
        operation_id="jobs_cancel",
        request=JobCancelInput,
        responses={200: JobOutputSerializer, 409: ErrorSerializer},
        description="A queued job is cancelled at once; a running one becomes `cancelling` and stops at its "
        "next step boundary, keeping its checkpoints.",
    )
    def post(self, request, job_id):
        tenant = tenant_of(request)
        job = job_get(tenant.organization, job_id)
        s = self.JobCancelInput(data=request.data)
        s.is_valid(raise_exception=True)
        job = job_cancel(job=job, actor=actor_of(request), reason=s.validated_data["reason"])
        return Response(JobOutputSerializer(job).data)


class MetricSeriesSerializer(serializers.Serializer):
    name = serializers.CharField()
    steps = serializers.ListField(child=serializers.IntegerField())
    values = serializers.ListField(child=serializers.FloatField())
    downsampled = serializers.BooleanField()


class MetricsOutputSerializer(serializers.Serializer):
    series = MetricSeriesSerializer(many=True)


class JobMetricsApi(APIView):
    read_scope = Scope.JOBS_READ

    class JobMetricsFilter(StrictSerializer):
        name = serializers.ListField(
            child=serializers.CharField(max_length=100),
            required=False,
            max_length=50,
            help_text="Metric names (repeat the parameter); all metrics when absent.",
        )
        step_min = serializers.IntegerField(required=False, min_value=0)
        step_max = serializers.IntegerField(required=False, min_value=0)
        max_points = serializers.IntegerField(required=False, min_value=1, max_value=5000, default=1000)

        def validate(self, attrs):
            if "step_min" in attrs and "step_max" in attrs and attrs["step_min"] > attrs["step_max"]:
                raise serializers.ValidationError({"step_min": ["must not be greater than step_max"]})
            return attrs

    @extend_schema(
        operation_id="jobs_metrics",
        parameters=[
            OpenApiParameter("name", OpenApiTypes.STR, many=True, description="Metric name; repeatable."),
            OpenApiParameter("step_min", OpenApiTypes.INT),
            OpenApiParameter("step_max", OpenApiTypes.INT),
            OpenApiParameter(
                "max_points", OpenApiTypes.INT, description="Downsample each series to this many."
            ),
        ],
        responses={200: MetricsOutputSerializer},
    )
    def get(self, request, job_id):
        job = job_get(tenant_of(request).organization, job_id)
        d = query_filters(request, self.JobMetricsFilter, multi=("name",))
        series = metric_series(
            job,
            names=d.get("name"),
            step_min=d.get("step_min"),
            step_max=d.get("step_max"),
            max_points=d["max_points"],
        )
        return Response(MetricsOutputSerializer({"series": series}).data)


class EventSerializer(serializers.Serializer):
    seq = serializers.IntegerField()
    kind = serializers.CharField()
    created_at = serializers.DateTimeField()
    actor = serializers.CharField(source="actor_label")
    from_state = serializers.CharField()
    to_state = serializers.CharField()
    message = serializers.CharField()
    data = serializers.JSONField()


class EventPageSerializer(serializers.Serializer):
    results = EventSerializer(many=True)
    next_after = serializers.IntegerField(allow_null=True)


class JobEventsApi(APIView):
    read_scope = Scope.JOBS_READ

    class JobEventsFilter(StrictSerializer):
        after = serializers.IntegerField(required=False, min_value=0, default=0)
        limit = serializers.IntegerField(required=False, min_value=1, max_value=500, default=100)

    @extend_schema(
        operation_id="jobs_events",
        parameters=[JobEventsFilter],
        responses={200: EventPageSerializer},
        description="Events in order after sequence number `after`. `next_after` is the `after` to send for "
        "the next page, or null when this page is the last one so far.",
    )
    def get(self, request, job_id):
        job = job_get(tenant_of(request).organization, job_id)
        d = query_filters(request, self.JobEventsFilter)
        limit = d["limit"]
        events = event_list(job, after=d["after"], limit=limit)
        next_after = events[-1].seq if len(events) == limit else None
        return Response(EventPageSerializer({"results": events, "next_after": next_after}).data)


class CheckpointFileSerializer(serializers.Serializer):
    name = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    download_url = serializers.URLField()


class CheckpointSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    step = serializers.IntegerField()
    uri = serializers.CharField()
    created_at = serializers.DateTimeField()
    size_bytes = serializers.IntegerField()
    files = serializers.SerializerMethodField()

    @extend_schema_field(CheckpointFileSerializer(many=True))
    def get_files(self, obj):
        request = self.context["request"]
        return [
            {
                "name": f["name"],
                "size": f.get("size", 0),
                "sha256": f.get("sha256", ""),
                "download_url": request.build_absolute_uri(
                    f"/api/v1/jobs/{obj.job_id}/checkpoints/{obj.pk}/files/{f['name']}"
                ),
            }
            for f in obj.files
        ]


class CheckpointListSerializer(serializers.Serializer):
    results = CheckpointSerializer(many=True)


class JobCheckpointsApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(operation_id="jobs_checkpoints", responses={200: CheckpointListSerializer})
    def get(self, request, job_id):
        job = job_get(tenant_of(request).organization, job_id)
        data = CheckpointSerializer(checkpoint_list(job), many=True, context={"request": request}).data
        return Response({"results": data})


class CheckpointFileApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(
        operation_id="jobs_checkpoint_file",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="The file."),
            302: OpenApiResponse(description="Redirect to a short-lived signed URL (S3)."),
        },
    )
    def get(self, request, job_id, checkpoint_id, name):
        job = job_get(tenant_of(request).organization, job_id)
        checkpoint = checkpoint_get(job, checkpoint_id)
        if name not in {f["name"] for f in checkpoint.files}:
            raise NotFound("no such file")
        uri = storage.file_uri(checkpoint.uri, name)
        if uri.startswith("s3://"):
            return HttpResponseRedirect(storage.presigned_url(uri))
        return FileResponse(
            storage.local_path(uri).open("rb"), as_attachment=True, filename=name.rsplit("/")[-1]
        )
