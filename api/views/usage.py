"""The caller's organization's usage: GPU- and CPU-hours per month against its monthly quota."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from api.tenancy import tenant_of
from portal.selectors.usage import organization_usage


class MonthUsageSerializer(serializers.Serializer):
    month = serializers.DateField(help_text="First day of the month (UTC).")
    gpu_hours = serializers.FloatField()
    cpu_hours = serializers.FloatField()
    gpu_hours_quota = serializers.IntegerField(allow_null=True, help_text="Monthly quota (current month).")
    running_gpus = serializers.IntegerField(help_text="GPUs held right now (current month only).")
    tinker_tokens = serializers.IntegerField(help_text="Tokens the Tinker API's model servers processed.")
    model_server_hours = serializers.FloatField(help_text="Model-server time the Tinker API's calls took.")


class OrgUsageApi(APIView):
    @extend_schema(
        operation_id="org_usage",
        responses={200: MonthUsageSerializer(many=True)},
        description="GPU- and CPU-hours your organization used per month, newest first (last 12 months).",
    )
    def get(self, request):
        return Response(
            MonthUsageSerializer(organization_usage(tenant_of(request).organization), many=True).data
        )
