"""What a job can use: environments visible to the organization and the model presets."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from api.serializers import StrictSerializer
from api.tenancy import tenant_of
from api.views.jobs import ERRORS, Pagination, _query_dict
from env_registry.models import EnvironmentPackage
from env_registry.selectors import package_get, package_visible_list, version_list
from opentinker.spec import MODEL_PRESETS
from portal.models import Scope


class EnvironmentSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="organization.slug")
    latest_version = serializers.SerializerMethodField()
    versions = serializers.SerializerMethodField()
    tags = serializers.ListField(child=serializers.CharField())

    class Meta:
        model = EnvironmentPackage
        fields = [
            "owner",
            "name",
            "description",
            "visibility",
            "tags",
            "latest_version",
            "versions",
            "updated_at",
        ]

    def get_versions(self, obj) -> list[str]:
        return [v.version for v in version_list(obj)]

    def get_latest_version(self, obj) -> str | None:
        valid = [v.version for v in version_list(obj) if v.status == "valid"]
        return valid[0] if valid else None


class EnvironmentListApi(APIView):
    read_scope = Scope.ENVS_READ

    class EnvironmentListFilter(StrictSerializer):
        q = serializers.CharField(required=False, max_length=100)
        tag = serializers.CharField(required=False, max_length=32)
        limit = serializers.IntegerField(required=False, min_value=1, max_value=Pagination.max_limit)
        offset = serializers.IntegerField(required=False, min_value=0)

    @extend_schema(
        operation_id="envs_list",
        parameters=[EnvironmentListFilter],
        responses={200: EnvironmentSerializer(many=True)},
    )
    def get(self, request):
        f = self.EnvironmentListFilter(data=_query_dict(request))
        f.is_valid(raise_exception=True)
        qs = package_visible_list(
            tenant_of(request).organization,
            q=f.validated_data.get("q", ""),
            tag=f.validated_data.get("tag", ""),
        )
        paginator = Pagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(EnvironmentSerializer(page, many=True).data)


class EnvironmentDetailApi(APIView):
    read_scope = Scope.ENVS_READ

    @extend_schema(operation_id="envs_get", responses={200: EnvironmentSerializer, **ERRORS})
    def get(self, request, owner: str, name: str):
        package = package_get(tenant_of(request).organization, owner=owner, name=name)
        return Response(EnvironmentSerializer(package).data)


class ModelPresetSerializer(serializers.Serializer):
    name = serializers.CharField()
    family = serializers.CharField()
    params = serializers.CharField()
    description = serializers.CharField()


class ModelListSerializer(serializers.Serializer):
    results = ModelPresetSerializer(many=True)


class ModelListApi(APIView):
    @extend_schema(operation_id="models_list", responses={200: ModelListSerializer})
    def get(self, request):
        presets = [{"name": name, **info} for name, info in sorted(MODEL_PRESETS.items())]
        return Response({"results": presets})
