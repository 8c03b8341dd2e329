"""What a job can use: the model presets (environments are in api/views/envs.py)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from opentinker.spec import MODEL_PRESETS


class ModelPresetSerializer(serializers.Serializer):
    name = serializers.CharField()
    family = serializers.CharField()
    params = serializers.CharField()
    description = serializers.CharField()


class ModelListSerializer(serializers.Serializer):
    results = ModelPresetSerializer(many=True)


class ModelListApi(APIView):
    schema_never_answers = (403,)  # any signed-in caller: no scope, no organization needed

    @extend_schema(operation_id="models_list", responses={200: ModelListSerializer})
    def get(self, request):
        presets = [{"name": name, **info} for name, info in sorted(MODEL_PRESETS.items())]
        return Response({"results": presets})
