"""An organization's own models and datasets: resumable uploads, listings with versions, previews.

Upload protocol (the CLI's `opentinker models push` / `datasets push` speak it):
1. `POST /org/uploads` {kind, name, files: [{path, size, sha256}]}: refused at once if the files cannot make
   a model (pickle weights, code, no config/tokenizer/safetensors) or a dataset, or pass REGISTRY_MAX_BYTES.
2. `PUT /org/uploads/{id}/files/{index}?offset=N` with the raw bytes of one chunk (at most
   `chunk_max_bytes`), in order; a wrong offset is a 409 saying where to go on.
3. `GET /org/uploads/{id}`: how much of each file arrived (to resume after a lost connection).
4. `POST /org/uploads/{id}/complete`: sizes and sha256 checked, contents checked (models: no remote code,
   safetensors headers; datasets: readable, rows), stored as the next version; a refusal deletes the upload.
Where the store is S3 (`multipart` in the upload), step 2 may instead send a file straight to the store:
`POST .../files/{index}/multipart` (presigned part links), PUT the parts there, `POST .../multipart/complete`
with their ETags; the server checks the size there and the sha256 from the stored bytes at step 4.
Also: `POST /jobs/{id}/promote` (a checkpoint into the model registry, server side) and
`POST /org/model-imports` (an allow-listed Hub repository, fetched by a Celery task; org admins).
Registry routes use the `envs:read` / `envs:write` scopes (the registry's); imports `org:admin`.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser
from rest_framework.response import Response
from rest_framework.views import APIView

from api.parsers import read_limited
from api.serializers import ErrorSerializer, StrictSerializer
from api.tenancy import tenant_of
from env_registry import dataset_registry, hub_import, model_promote, model_registry, uploads
from env_registry.models import DatasetVersion, ModelVersion, RegisteredDataset, RegisteredModel, Upload
from portal.errors import DomainError
from portal.models import Scope
from portal.selectors.jobs import job_get


class ChunkParser(BaseParser):
    """One chunk's raw bytes, at most CHUNK_MAX_BYTES (413 past it)."""

    media_type = "application/octet-stream"

    def parse(self, stream, media_type=None, parser_context=None):
        limit = uploads.CHUNK_MAX_BYTES
        return read_limited(
            stream,
            parser_context,
            limit,
            declared_too_large=lambda n: f"a chunk is at most {limit} bytes; this one is {n}",
            too_large=f"a chunk is at most {limit} bytes",
        )


# --- uploads ------------------------------------------------------------------------------------------------


class UploadFileSerializer(serializers.Serializer):
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    received = serializers.IntegerField()
    direct = serializers.SerializerMethodField(help_text="Sent straight to the store (S3 multipart).")

    def get_direct(self, obj) -> bool:
        return bool(obj.get("direct") or obj.get("multipart"))


class UploadSerializer(serializers.ModelSerializer):
    files = UploadFileSerializer(many=True)
    chunk_max_bytes = serializers.SerializerMethodField()
    multipart = serializers.SerializerMethodField(
        help_text="Whether files may go straight to the object store (S3) with presigned part links: "
        "POST .../files/{index}/multipart."
    )

    class Meta:
        model = Upload
        fields = [
            "id",
            "kind",
            "name",
            "description",
            "files",
            "size_bytes",
            "chunk_max_bytes",
            "multipart",
            "created_at",
        ]
        read_only_fields = fields

    def get_chunk_max_bytes(self, obj) -> int:
        return uploads.CHUNK_MAX_BYTES

    def get_multipart(self, obj) -> bool:
        return uploads.multipart_offered()


class DeclaredFileInput(StrictSerializer):
    path = serializers.CharField(max_length=300)
    size = serializers.IntegerField(min_value=0)
    sha256 = serializers.RegexField(uploads.SHA256_RE, help_text="64 lowercase hex digits")


class UploadListApi(APIView):
    write_scope = Scope.ENVS_WRITE

    class StartInput(StrictSerializer):
        kind = serializers.ChoiceField(choices=Upload.Kind.choices)
        name = serializers.CharField(max_length=64)
        description = serializers.CharField(max_length=500, required=False, allow_blank=True)
        files = DeclaredFileInput(many=True)

    @extend_schema(
        operation_id="uploads_start",
        request=StartInput,
        responses={201: UploadSerializer, 400: ErrorSerializer},
        description="Open a resumable upload of a model directory or a dataset; refused at once if its files "
        "cannot make one (pickle weights, code, a missing config, tokenizer or safetensors) or if it would "
        "pass the organization's REGISTRY_MAX_BYTES.",
    )
    def post(self, request):
        tenant = tenant_of(request)
        body = self.StartInput(data=request.data)
        body.is_valid(raise_exception=True)
        d = body.validated_data
        files = uploads.declared_files([dict(f) for f in d["files"]])
        start = (
            model_registry.model_upload_start
            if d["kind"] == Upload.Kind.MODEL
            else dataset_registry.dataset_upload_start
        )
        upload = start(
            organization=tenant.organization,
            user=request.user,
            name=d["name"],
            files=files,
            description=d.get("description", ""),
        )
        return Response(UploadSerializer(upload).data, status=status.HTTP_201_CREATED)


class UploadDetailApi(APIView):
    read_scope = Scope.ENVS_WRITE
    write_scope = Scope.ENVS_WRITE

    @extend_schema(
        operation_id="uploads_get",
        responses={200: UploadSerializer},
        description="How much of each file arrived.",
    )
    def get(self, request, upload_id: str):
        upload = uploads.upload_get(tenant_of(request).organization, upload_id)
        return Response(UploadSerializer(upload).data)

    @extend_schema(
        operation_id="uploads_abort", responses={204: None}, description="Drop the upload and its bytes."
    )
    def delete(self, request, upload_id: str):
        upload = uploads.upload_get(tenant_of(request).organization, upload_id)
        uploads.upload_discard(upload)
        return Response(status=status.HTTP_204_NO_CONTENT)


class UploadChunkApi(APIView):
    write_scope = Scope.ENVS_WRITE
    parser_classes = [ChunkParser]

    @extend_schema(
        operation_id="uploads_chunk",
        parameters=[
            OpenApiParameter("offset", OpenApiTypes.INT, required=True, description="Where it goes.")
        ],
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={200: UploadSerializer, 400: ErrorSerializer, 409: ErrorSerializer, 413: ErrorSerializer},
        description="Append one chunk to file `index` at `offset` (what arrived of it so far). Every chunk "
        "but a file's last is at least 1 MiB (or `chunk_max_bytes` where lower).",
    )
    def put(self, request, upload_id: str, index: int):
        upload = uploads.upload_get(tenant_of(request).organization, upload_id)
        try:
            offset = int(request.query_params.get("offset", ""))
        except ValueError:
            raise DomainError("offset: a number of bytes is required", field="offset") from None
        data = request.data if isinstance(request.data, bytes) else b""
        upload = uploads.upload_chunk(upload, index=index, offset=offset, data=data)
        return Response(UploadSerializer(upload).data)


class MultipartPartSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    url = serializers.CharField()


class MultipartStartOutput(serializers.Serializer):
    part_bytes = serializers.IntegerField(help_text="Every part but the last holds exactly this many bytes.")
    expires_in = serializers.IntegerField(help_text="Seconds the links work; ask again for fresh ones.")
    parts = MultipartPartSerializer(many=True)


class UploadMultipartApi(APIView):
    write_scope = Scope.ENVS_WRITE

    @extend_schema(
        operation_id="uploads_multipart_start",
        request=None,
        responses={200: MultipartStartOutput, 400: ErrorSerializer, 409: ErrorSerializer},
        description="Send file `index` straight to the object store (S3 stores only; `multipart` in the "
        "upload says so): an S3 multipart upload with a presigned link per part. PUT each part's bytes "
        "to its link, keep the `ETag` header of each answer, then POST them to `.../multipart/complete`. "
        "Asked again, the same multipart upload with fresh links. At most 1000 parts.",
    )
    def post(self, request, upload_id: str, index: int):
        upload = uploads.upload_get(tenant_of(request).organization, upload_id)
        return Response(uploads.upload_multipart_start(upload, index=index))


class MultipartPartInput(StrictSerializer):
    number = serializers.IntegerField(min_value=1, max_value=uploads.MULTIPART_MAX_PARTS)
    etag = serializers.CharField(max_length=200, help_text="The ETag header of the part's PUT answer.")


class UploadMultipartCompleteApi(APIView):
    write_scope = Scope.ENVS_WRITE

    class CompleteInput(StrictSerializer):
        parts = MultipartPartInput(many=True, max_length=uploads.MULTIPART_MAX_PARTS, allow_empty=False)

    @extend_schema(
        operation_id="uploads_multipart_complete",
        request=CompleteInput,
        responses={200: UploadSerializer, 400: ErrorSerializer, 409: ErrorSerializer},
        description="Put file `index`'s parts together ({parts: [{number, etag}]}, every part once) and "
        "check the object's size against the declared one (a wrong size drops it: send the file again). Its "
        "sha256 is checked by the server when the upload completes, from the stored bytes.",
    )
    def post(self, request, upload_id: str, index: int):
        upload = uploads.upload_get(tenant_of(request).organization, upload_id)
        body = self.CompleteInput(data=request.data)
        body.is_valid(raise_exception=True)
        etags = [(p["number"], p["etag"]) for p in body.validated_data["parts"]]
        upload = uploads.upload_multipart_complete(upload, index=index, etags=etags)
        return Response(UploadSerializer(upload).data)


# --- models and datasets ------------------------------------------------------------------------------------


class ModelVersionSerializer(serializers.ModelSerializer):
    ref = serializers.SerializerMethodField()
    uploaded_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    files = serializers.JSONField()
    info = serializers.JSONField()

    class Meta:
        model = ModelVersion
        fields = [
            "ref",
            "version",
            "status",
            "validation_error",
            "info",
            "files",
            "size_bytes",
            "uploaded_by",
            "created_at",
            "validated_at",
        ]
        read_only_fields = fields

    def get_ref(self, obj) -> str:
        return f"{obj.model.organization.slug}/{obj.model.name}@{obj.version}"


class ModelSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="organization.slug")
    versions = ModelVersionSerializer(many=True)

    class Meta:
        model = RegisteredModel
        fields = ["owner", "name", "description", "versions", "created_at", "updated_at"]
        read_only_fields = fields


class DatasetVersionSerializer(serializers.ModelSerializer):
    ref = serializers.SerializerMethodField()
    uploaded_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    files = serializers.JSONField()
    columns = serializers.JSONField()
    preview = serializers.JSONField()

    class Meta:
        model = DatasetVersion
        fields = [
            "ref",
            "version",
            "format",
            "num_rows",
            "columns",
            "preview",
            "files",
            "size_bytes",
            "uploaded_by",
            "created_at",
        ]
        read_only_fields = fields

    def get_ref(self, obj) -> str:
        return f"{obj.dataset.organization.slug}/{obj.dataset.name}@{obj.version}"


class DatasetSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="organization.slug")
    versions = DatasetVersionSerializer(many=True)

    class Meta:
        model = RegisteredDataset
        fields = ["owner", "name", "description", "versions", "created_at", "updated_at"]
        read_only_fields = fields


class CompleteOutput(serializers.Serializer):
    kind = serializers.ChoiceField(choices=Upload.Kind.choices)
    ref = serializers.CharField()
    model = ModelVersionSerializer(allow_null=True)
    dataset = DatasetVersionSerializer(allow_null=True)


class UploadCompleteApi(APIView):
    write_scope = Scope.ENVS_WRITE

    @extend_schema(
        operation_id="uploads_complete",
        request=None,
        responses={201: CompleteOutput, 400: ErrorSerializer, 404: ErrorSerializer, 409: ErrorSerializer},
        description="Check the uploaded files and store them as the next version (`owner/name@N`); a model "
        "is then validated in the sandbox (its `status`). A refusal deletes the upload: nothing is stored. "
        "One completion at a time: a concurrent one gets 409, a later one 404 (the upload is gone).",
    )
    def post(self, request, upload_id: str):
        upload = uploads.upload_get(tenant_of(request).organization, upload_id)
        if upload.kind == Upload.Kind.MODEL:
            version = model_registry.model_upload_complete(upload)
            version.refresh_from_db()
            out = {"kind": "model", "model": ModelVersionSerializer(version).data, "dataset": None}
            out["ref"] = out["model"]["ref"]
        else:
            dversion = dataset_registry.dataset_upload_complete(upload)
            out = {"kind": "dataset", "model": None, "dataset": DatasetVersionSerializer(dversion).data}
            out["ref"] = out["dataset"]["ref"]
        return Response(out, status=status.HTTP_201_CREATED)


class ModelListApi(APIView):
    read_scope = Scope.ENVS_READ

    @extend_schema(
        operation_id="org_models_list",
        responses={200: ModelSerializer(many=True)},
        description="Your organization's registry models with their versions (use one as `model.base`: "
        "`owner/name@N` or `owner/name@latest`, a valid version).",
    )
    def get(self, request):
        models = model_registry.model_list(tenant_of(request).organization).select_related("organization")
        return Response(ModelSerializer(models, many=True).data)


class ModelDetailApi(APIView):
    read_scope = Scope.ENVS_READ

    @extend_schema(operation_id="org_models_get", responses={200: ModelSerializer})
    def get(self, request, name: str):
        return Response(ModelSerializer(model_registry.model_get(tenant_of(request).organization, name)).data)


class DatasetListApi(APIView):
    read_scope = Scope.ENVS_READ

    @extend_schema(
        operation_id="org_datasets_list",
        responses={200: DatasetSerializer(many=True)},
        description="Your organization's datasets with their versions and previews (use one as "
        "`dataset.uri`: `owner/name@N` or `owner/name@latest`).",
    )
    def get(self, request):
        datasets = dataset_registry.dataset_list(tenant_of(request).organization).select_related(
            "organization"
        )
        return Response(DatasetSerializer(datasets, many=True).data)


class DatasetDetailApi(APIView):
    read_scope = Scope.ENVS_READ

    @extend_schema(operation_id="org_datasets_get", responses={200: DatasetSerializer})
    def get(self, request, name: str):
        dataset = dataset_registry.dataset_get(tenant_of(request).organization, name)
        return Response(DatasetSerializer(dataset).data)


class ModelPromoteApi(APIView):
    write_scope = Scope.ENVS_WRITE

    class PromoteInput(StrictSerializer):
        name = serializers.CharField(max_length=64, help_text="The registry model to add a version to.")
        step = serializers.IntegerField(
            min_value=0, max_value=10**9, required=False, allow_null=True, help_text="Default: the latest."
        )
        description = serializers.CharField(max_length=500, required=False, allow_blank=True)

    @extend_schema(
        operation_id="jobs_promote",
        request=PromoteInput,
        responses={201: CompleteOutput, 400: ErrorSerializer, 404: ErrorSerializer},
        description="Copy the job's checkpoint at `step` (default: the latest) into your organization's "
        "model registry as `name`'s next version, server side: each file's size and sha256 checked against "
        "the checkpoint's record, trainer state left out, checked like an upload, validated in the sandbox "
        "(its `status`). A LoRA checkpoint becomes an adapter with the job's base pinned. Members and up.",
    )
    def post(self, request, job_id: str):
        tenant = tenant_of(request)
        job = job_get(tenant.organization, job_id)
        body = self.PromoteInput(data=request.data)
        body.is_valid(raise_exception=True)
        d = body.validated_data
        version = model_promote.model_promote(
            organization=tenant.organization,
            user=request.user,
            job=job,
            step=d.get("step"),
            name=d["name"],
            description=d.get("description", ""),
        )
        version.refresh_from_db()
        data = ModelVersionSerializer(version).data
        return Response(
            {"kind": "model", "ref": data["ref"], "model": data, "dataset": None},
            status=status.HTTP_201_CREATED,
        )


class ModelImportApi(APIView):
    scopes = {"POST": Scope.ORG_ADMIN}

    class ImportInput(StrictSerializer):
        repo = serializers.CharField(max_length=200, help_text="`owner/name` on the Hugging Face Hub.")
        name = serializers.CharField(max_length=64, help_text="The registry model to add a version to.")
        revision = serializers.CharField(max_length=128, required=False, allow_null=True)

    @extend_schema(
        operation_id="org_models_import",
        request=ImportInput,
        responses={202: CompleteOutput, 400: ErrorSerializer, 403: ErrorSerializer},
        description="Import an allow-listed (HUB_IMPORT_ALLOW) Hugging Face Hub repository into your "
        "organization's model registry as `name`'s next version: reserved now (`pending`, `info.import` "
        "`queued`), fetched from HUB_ENDPOINT by a background task (only safetensors, configs and tokenizer "
        "files), checked like an upload and validated in the sandbox; follow it with GET "
        "/org/models/{name}. A refused repository (pickle weights only, remote code, too big) leaves the "
        "version `invalid` with the reason and no file stored. Organization admins only.",
    )
    def post(self, request):
        tenant = tenant_of(request)
        body = self.ImportInput(data=request.data)
        body.is_valid(raise_exception=True)
        d = body.validated_data
        version = hub_import.model_import_request(
            organization=tenant.organization,
            user=request.user,
            repo_id=d["repo"],
            name=d["name"],
            revision=d.get("revision"),
        )
        data = ModelVersionSerializer(version).data
        return Response(
            {"kind": "model", "ref": data["ref"], "model": data, "dataset": None},
            status=status.HTTP_202_ACCEPTED,
        )
