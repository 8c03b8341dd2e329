"""Platform admin API: organizations and their quotas, pools, the queue, preemption and usage.

Staff only; everyone else gets 404."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import TypeVar

from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import page_response
from api.permissions import IsPlatformStaff
from api.schema import paginated
from api.serializers import ErrorSerializer, StrictSerializer
from api.views.jobs import JobOutputSerializer
from api.views.orgs import QuotaSerializer
from portal.actors import Actor
from portal.errors import DomainError, NotFound
from portal.models import ComputePool, Organization
from portal.scheduling.policy import Why
from portal.selectors.admin import job_get_any, organization_get, organization_list
from portal.selectors.queue import pool_get, pool_list, queue_explain
from portal.selectors.usage import usage_by_organization
from portal.services.pools import pool_create, pool_delete, pool_update
from portal.services.quotas import quota_set
from portal.services.supervision import job_preempt


class StaffOnly(IsPlatformStaff):
    # Non-staff must not learn that admin endpoints exist: answer 404, as for any unknown URL.
    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            if request.user and request.user.is_authenticated:
                raise Http404
            return False
        return True


class AdminOrgSerializer(serializers.ModelSerializer):
    quota = QuotaSerializer()
    members = serializers.IntegerField()  # annotated by organization_list

    class Meta:
        model = Organization
        fields = ["slug", "name", "created_at", "members", "quota"]


T = TypeVar("T")


def _found(lookup: Callable[[str], T], key: str) -> T:
    # The bare 404 of an unknown URL, as StaffOnly answers, rather than the selector's own message.
    try:
        return lookup(key)
    except NotFound:
        raise Http404 from None


class AdminOrgListApi(APIView):
    permission_classes = [StaffOnly]

    @extend_schema(operation_id="admin_orgs_list", responses={200: paginated(AdminOrgSerializer)})
    def get(self, request):
        return page_response(self, request, organization_list(), AdminOrgSerializer)


class AdminQuotaApi(APIView):
    permission_classes = [StaffOnly]

    class QuotaUpdateInput(StrictSerializer):
        max_gpus = serializers.IntegerField(required=False, min_value=0, max_value=4096)
        borrowing_limit_gpus = serializers.IntegerField(required=False, min_value=0, max_value=4096)
        gpu_hours_per_month = serializers.IntegerField(required=False, min_value=0, max_value=10_000_000)
        max_queued_jobs = serializers.IntegerField(required=False, min_value=0, max_value=100_000)
        max_cpus_per_job = serializers.IntegerField(required=False, min_value=1, max_value=1024)
        fair_share_weight = serializers.FloatField(required=False, min_value=0.01, max_value=1000)
        allowed_pools = serializers.ListField(
            child=serializers.RegexField(r"^[a-z0-9][a-z0-9-]{0,63}$"), required=False, max_length=100
        )

    @extend_schema(operation_id="admin_quota_get", responses={200: QuotaSerializer})
    def get(self, request, slug: str):
        return Response(QuotaSerializer(_found(organization_get, slug).quota).data)

    @extend_schema(
        operation_id="admin_quota_update",
        request=QuotaUpdateInput,
        responses={200: QuotaSerializer},
        description="Change some of an organization's quota fields; the others keep their values.",
    )
    def patch(self, request, slug: str):
        org = _found(organization_get, slug)
        s = self.QuotaUpdateInput(data=request.data)
        s.is_valid(raise_exception=True)
        quota = quota_set(organization=org, by=request.user, **s.validated_data)
        return Response(QuotaSerializer(quota).data)


# --- pools, queue, preemption, usage ------------------------------------------------------------------------


class PoolSerializer(serializers.ModelSerializer):
    used_slots = serializers.IntegerField(read_only=True)
    borrowed_slots = serializers.IntegerField(read_only=True)
    running_jobs = serializers.IntegerField(read_only=True)
    gpus_by_type = serializers.DictField(child=serializers.IntegerField(), read_only=True)
    labels = serializers.DictField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = ComputePool
        fields = [
            "name",
            "driver",
            "ray_address",
            "enabled",
            "health",
            "health_message",
            "last_heartbeat",
            "gpus_by_type",
            "total_gpus",
            "cpu_slots",
            "cpus",
            "memory_bytes",
            "used_slots",
            "borrowed_slots",
            "running_jobs",
            "labels",
            "created_at",
        ]
        read_only_fields = fields


def _pool_out(name: str):
    return PoolSerializer(_found(pool_get, name)).data


class AdminPoolListApi(APIView):
    permission_classes = [StaffOnly]

    class PoolCreateInput(StrictSerializer):
        name = serializers.RegexField(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
        driver = serializers.ChoiceField(choices=ComputePool.Driver.choices, default="local")
        ray_address = serializers.CharField(max_length=300, required=False, default="", allow_blank=True)
        enabled = serializers.BooleanField(required=False, default=True)
        labels = serializers.DictField(
            child=serializers.CharField(max_length=200), required=False, default=dict
        )

    @extend_schema(operation_id="admin_pools_list", responses={200: PoolSerializer(many=True)})
    def get(self, request):
        return Response(PoolSerializer(pool_list(), many=True).data)

    @extend_schema(
        operation_id="admin_pools_create",
        request=PoolCreateInput,
        responses={201: PoolSerializer, 409: ErrorSerializer},
        description="Register a pool. Its capacity and health are read from the pool itself by the workers.",
    )
    def post(self, request):
        s = self.PoolCreateInput(data=request.data)
        s.is_valid(raise_exception=True)
        pool = pool_create(**s.validated_data)
        return Response(_pool_out(pool.name), status=status.HTTP_201_CREATED)


class AdminPoolDetailApi(APIView):
    permission_classes = [StaffOnly]

    class PoolUpdateInput(StrictSerializer):
        ray_address = serializers.CharField(max_length=300, required=False, allow_blank=True)
        enabled = serializers.BooleanField(required=False)
        labels = serializers.DictField(child=serializers.CharField(max_length=200), required=False)

    @extend_schema(operation_id="admin_pool_get", responses={200: PoolSerializer})
    def get(self, request, pool: str):
        return Response(_pool_out(pool))

    @extend_schema(
        operation_id="admin_pool_update",
        request=PoolUpdateInput,
        responses={200: PoolSerializer},
        description="Enable or disable a pool (a disabled pool admits nothing new), or change its labels.",
    )
    def patch(self, request, pool: str):
        row = _found(pool_get, pool)
        s = self.PoolUpdateInput(data=request.data)
        s.is_valid(raise_exception=True)
        pool_update(pool=row, **s.validated_data)
        return Response(_pool_out(pool))

    @extend_schema(
        operation_id="admin_pool_delete",
        responses={204: None, 409: ErrorSerializer},
        description="Delete a pool that runs no job (409 otherwise).",
    )
    def delete(self, request, pool: str):
        row = _found(pool_get, pool)
        pool_delete(pool=row)
        return Response(status=status.HTTP_204_NO_CONTENT)


class QueueEntrySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    organization = serializers.CharField()
    gpus = serializers.IntegerField()
    cpus = serializers.IntegerField()
    priority = serializers.IntegerField()
    pool = serializers.CharField(allow_null=True)
    attempt = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    waiting_seconds = serializers.FloatField()
    category = serializers.ChoiceField(
        choices=[why.value for why in Why],
        help_text="Why it waits. `reservation`: free slots of a pool are held for this long-waiting job "
        "(it starts as the rest free up), or this job waits behind such a hold and may only backfill onto "
        "what it does not need.",
    )
    reason = serializers.CharField()


class QueuePageSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    results = QueueEntrySerializer(many=True)


class AdminQueueApi(APIView):
    permission_classes = [StaffOnly]

    @extend_schema(
        operation_id="admin_queue",
        parameters=[
            OpenApiParameter("limit", int, description="At most 1000 (default 200)."),
            OpenApiParameter("offset", int),
        ],
        responses={200: QueuePageSerializer},
        description="Queued jobs in scheduling order, each with why it waits now (quota, capacity, fair "
        "share, pool or a reservation), from a read-only run of the scheduler's own plan.",
    )
    def get(self, request):
        limit = _int_param(request, "limit", 200, 1, 1000)
        offset = _int_param(request, "offset", 0, 0, 10_000_000)
        count, rows = queue_explain(limit=limit, offset=offset)
        return Response({"count": count, "results": QueueEntrySerializer(rows, many=True).data})


def _int_param(request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DomainError(f"{name} must be an integer", field=name) from None
    if not lo <= value <= hi:
        raise DomainError(f"{name} must be between {lo} and {hi}", field=name)
    return value


class AdminPreemptApi(APIView):
    permission_classes = [StaffOnly]

    class PreemptInput(StrictSerializer):
        reason = serializers.CharField(max_length=300, required=False, default="", allow_blank=True)

    @extend_schema(
        operation_id="admin_job_preempt",
        request=PreemptInput,
        responses={202: JobOutputSerializer, 409: ErrorSerializer},
        description="Preempt a running job of any organization: it checkpoints, stops and is re-queued "
        "(an admitted job not yet started is re-queued at once). Not counted against its retry limit.",
    )
    def post(self, request, job_id: str):
        job = _found(job_get_any, job_id)
        s = self.PreemptInput(data=request.data)
        s.is_valid(raise_exception=True)
        job = job_preempt(job=job, actor=Actor.for_request(request.user), reason=s.validated_data["reason"])
        job = job_get_any(job.pk)
        return Response(JobOutputSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class UsageRowSerializer(serializers.Serializer):
    organization = serializers.CharField()
    month = serializers.DateField()
    gpu_hours = serializers.FloatField()
    cpu_hours = serializers.FloatField()
    gpu_hours_quota = serializers.IntegerField(allow_null=True)


class AdminUsageApi(APIView):
    permission_classes = [StaffOnly]

    @extend_schema(
        operation_id="admin_usage",
        parameters=[OpenApiParameter("month", str, description="YYYY-MM (default: the current month, UTC).")],
        responses={200: UsageRowSerializer(many=True)},
    )
    def get(self, request):
        return Response(UsageRowSerializer(usage_by_organization(parse_month(request)), many=True).data)


def parse_month(request) -> date:
    raw = request.query_params.get("month")
    if not raw:
        return timezone.now().date().replace(day=1)
    try:
        return datetime.strptime(raw, "%Y-%m").date()
    except ValueError:
        raise DomainError("month must look like 2026-01", field="month") from None
