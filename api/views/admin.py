"""Platform admin API: organizations and their quotas. Staff only; everyone else gets 404."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from api.permissions import IsPlatformStaff
from api.serializers import StrictSerializer
from api.views.jobs import ERRORS, Pagination
from api.views.orgs import QuotaSerializer
from portal.models import Organization
from portal.services.quotas import quota_set


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
    members = serializers.IntegerField(source="memberships.count")

    class Meta:
        model = Organization
        fields = ["slug", "name", "created_at", "members", "quota"]


def _org(slug: str) -> Organization:
    try:
        return Organization.objects.select_related("quota").get(slug=slug)
    except Organization.DoesNotExist:
        raise Http404 from None


class AdminOrgListApi(APIView):
    permission_classes = [StaffOnly]

    @extend_schema(operation_id="admin_orgs_list", responses={200: AdminOrgSerializer(many=True), **ERRORS})
    def get(self, request):
        paginator = Pagination()
        qs = Organization.objects.select_related("quota").order_by("slug")
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(AdminOrgSerializer(page, many=True).data)


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

    @extend_schema(operation_id="admin_quota_get", responses={200: QuotaSerializer, **ERRORS})
    def get(self, request, slug: str):
        return Response(QuotaSerializer(_org(slug).quota).data)

    @extend_schema(
        operation_id="admin_quota_update",
        request=QuotaUpdateInput,
        responses={200: QuotaSerializer, **ERRORS},
        description="Change some of an organization's quota fields; the others keep their values.",
    )
    def patch(self, request, slug: str):
        org = _org(slug)
        s = self.QuotaUpdateInput(data=request.data)
        s.is_valid(raise_exception=True)
        quota = quota_set(organization=org, by=request.user, **s.validated_data)
        return Response(QuotaSerializer(quota).data)
