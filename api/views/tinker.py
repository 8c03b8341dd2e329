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
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import PageFilter, page_response, query_filters
from api.schema import paginated
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


# Lists are pages (`limit`, default 50, at most 200, from `offset`: api.common.Pagination). A filter naming
# no object of the organization is a 404 (as the object's own route), not an empty list.
def _id_filter(help_text: str) -> serializers.CharField:
    return serializers.CharField(required=False, allow_blank=True, max_length=200, help_text=help_text)


class SessionListFilter(PageFilter):
    pass


class ModelListFilter(PageFilter):
    session = _id_filter("Only this session's (its id).")


class WeightsListFilter(PageFilter):
    session = _id_filter("Only this session's (its id).")
    model = _id_filter("Only this training client's (its model_id).")


def _filters(request, filter_class: type[PageFilter]) -> dict[str, str | None]:
    """The validated filters (a bad or unknown parameter is a 400); an empty id filters nothing."""
    d = query_filters(request, filter_class)
    return {"session": d.get("session") or None, "model": d.get("model") or None}


class TinkerSessionListApi(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(
        operation_id="tinker_sessions",
        parameters=[SessionListFilter],
        responses={200: paginated(TinkerSessionSerializer)},
        description="The organization's Tinker API sessions, newest first.",
    )
    def get(self, request):
        _filters(request, SessionListFilter)
        sessions = selectors.session_list(tenant_of(request).organization)
        return page_response(self, request, sessions, TinkerSessionSerializer)


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
        parameters=[ModelListFilter],
        responses={200: paginated(TinkerModelSerializer), 404: ErrorSerializer},
        description="The organization's training clients (LoRA adapters on a base model), newest first.",
    )
    def get(self, request):
        d = _filters(request, ModelListFilter)
        models = selectors.model_list(tenant_of(request).organization, session_id=d["session"])
        return page_response(self, request, models, TinkerModelSerializer)


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
        parameters=[WeightsListFilter],
        responses={200: paginated(TinkerWeightsSerializer), 404: ErrorSerializer},
        description="The organization's saved weights (save_state, save_weights_for_sampler), newest first.",
    )
    def get(self, request):
        d = _filters(request, WeightsListFilter)
        weights = selectors.weights_list(
            tenant_of(request).organization, model_id=d["model"], session_id=d["session"]
        )
        return page_response(self, request, weights, TinkerWeightsSerializer)


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
