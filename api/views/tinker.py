"""An organization's Tinker-API objects for people and the CLI (`opentinker tinker ...`): sessions, training
clients (base model, LoRA rank, steps) and saved weights with their `tinker://` paths and files.

Read-only, with the `jobs:read` scope (like a job's checkpoints); the SDK's own routes live under /tinker/.
A saved weights' files are served like a checkpoint's: a redirect to a signed URL on S3, the bytes for a
`file://` store. The adapter files are a PEFT adapter; merging one into its base needs torch, so it is the
CLI's `--merge-lora` (gpu_runtime merge-lora on the user's machine), never the web tier's.
"""

from __future__ import annotations

from django.http import FileResponse, HttpResponseRedirect
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from api.serializers import ErrorSerializer
from api.tenancy import tenant_of
from api.tinker import selectors
from portal import storage
from portal.models import Scope


class TinkerSessionSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    tags = serializers.ListField(child=serializers.CharField())
    sdk_version = serializers.CharField()
    created_at = serializers.DateTimeField()
    last_heartbeat_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    finish_reason = serializers.CharField()
    training_clients = serializers.IntegerField()
    samplers = serializers.IntegerField()


class TinkerModelSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="The training client's model_id, as the SDK knows it.")
    session = serializers.UUIDField(source="session_id")
    base_model = serializers.CharField()
    lora_rank = serializers.IntegerField(allow_null=True)
    steps = serializers.IntegerField(help_text="Completed optim_step calls.")
    forward_backward_calls = serializers.IntegerField(help_text="Completed forward_backward calls.")
    pending_calls = serializers.IntegerField()
    saved_weights = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    last_call_at = serializers.DateTimeField(allow_null=True)


class TinkerWeightsSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    path = serializers.SerializerMethodField(help_text="tinker://{model}/{kind}/{name}")
    kind = serializers.CharField(  # a plain string: a second "kind" enum would collide in the schema
        help_text="weights: a saved state (adapter and Adam moments); sampler_weights: an adapter only.",
    )
    name = serializers.CharField()
    model = serializers.CharField(source="model_id")
    base_model = serializers.CharField(source="model.base_model")
    lora_rank = serializers.IntegerField(source="model.lora_rank", allow_null=True)
    created_at = serializers.DateTimeField()

    def get_path(self, obj) -> str:
        return selectors.weights_path(obj)


class TinkerWeightsFileSerializer(serializers.Serializer):
    name = serializers.CharField()
    size = serializers.IntegerField()


class TinkerWeightsDetailSerializer(TinkerWeightsSerializer):
    files = serializers.SerializerMethodField(
        help_text="What storage holds now (the PEFT adapter: adapter_config.json, adapter_model.safetensors)."
    )

    @extend_schema_field(TinkerWeightsFileSerializer(many=True))
    def get_files(self, obj) -> list[dict]:
        return TinkerWeightsFileSerializer(selectors.weights_files(obj), many=True).data


class TinkerSessionDetailSerializer(TinkerSessionSerializer):
    models = serializers.SerializerMethodField()

    @extend_schema_field(TinkerModelSerializer(many=True))
    def get_models(self, obj) -> list[dict]:
        return TinkerModelSerializer(
            selectors.model_list(obj.organization, session_id=str(obj.pk)), many=True
        ).data


class TinkerModelDetailSerializer(TinkerModelSerializer):
    weights = serializers.SerializerMethodField()

    @extend_schema_field(TinkerWeightsSerializer(many=True))
    def get_weights(self, obj) -> list[dict]:
        return TinkerWeightsSerializer(
            selectors.weights_list(obj.organization, model_id=obj.pk), many=True
        ).data


def _listing(item: type[serializers.Serializer]) -> serializers.Serializer:
    return inline_serializer(item.__name__.removesuffix("Serializer") + "List", {"results": item(many=True)})


def _query(request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value or None


# A filter naming no object of the organization is a 404 (as the object's own route), not an empty list.
SESSION_FILTER = OpenApiParameter("session", str, description="Only this session's (its id).")
MODEL_FILTER = OpenApiParameter("model", str, description="Only this training client's (its model_id).")


class TinkerSessionListApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(
        operation_id="tinker_sessions",
        responses={200: _listing(TinkerSessionSerializer)},
        description="The organization's Tinker API sessions, newest first.",
    )
    def get(self, request):
        sessions = selectors.session_list(tenant_of(request).organization)
        return Response({"results": TinkerSessionSerializer(sessions, many=True).data})


class TinkerSessionDetailApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(operation_id="tinker_session", responses={200: TinkerSessionDetailSerializer})
    def get(self, request, session_id):
        session = selectors.session_detail(tenant_of(request).organization, session_id)
        return Response(TinkerSessionDetailSerializer(session).data)


class TinkerModelListApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(
        operation_id="tinker_models",
        parameters=[SESSION_FILTER],
        responses={200: _listing(TinkerModelSerializer), 404: ErrorSerializer},
        description="The organization's training clients (LoRA adapters on a base model), newest first.",
    )
    def get(self, request):
        org = tenant_of(request).organization
        models = selectors.model_list(org, session_id=_query(request, "session"))
        return Response({"results": TinkerModelSerializer(models, many=True).data})


class TinkerModelDetailApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(operation_id="tinker_model", responses={200: TinkerModelDetailSerializer})
    def get(self, request, model_id):
        model = selectors.model_detail(tenant_of(request).organization, model_id)
        return Response(TinkerModelDetailSerializer(model).data)


class TinkerWeightsListApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(
        operation_id="tinker_weights",
        parameters=[SESSION_FILTER, MODEL_FILTER],
        responses={200: _listing(TinkerWeightsSerializer), 404: ErrorSerializer},
        description="The organization's saved weights (save_state, save_weights_for_sampler), newest first.",
    )
    def get(self, request):
        org = tenant_of(request).organization
        weights = selectors.weights_list(
            org, model_id=_query(request, "model"), session_id=_query(request, "session")
        )
        return Response({"results": TinkerWeightsSerializer(weights, many=True).data})


class TinkerWeightsDetailApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(operation_id="tinker_weights_detail", responses={200: TinkerWeightsDetailSerializer})
    def get(self, request, weights_id):
        weights = selectors.weights_detail(tenant_of(request).organization, weights_id)
        return Response(TinkerWeightsDetailSerializer(weights).data)


class TinkerWeightsFileApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(
        operation_id="tinker_weights_file",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, description="The file."),
            302: OpenApiResponse(description="Redirect to a short-lived signed URL (S3)."),
        },
    )
    def get(self, request, weights_id, name):
        weights = selectors.weights_detail(tenant_of(request).organization, weights_id)
        uri = selectors.weights_file_uri(weights, name)
        if uri.startswith("s3://"):
            return HttpResponseRedirect(storage.presigned_url(uri))
        return FileResponse(storage.local_path(uri).open("rb"), as_attachment=True, filename=name)
