"""The environment registry and marketplace: search, detail, upload, metadata, stars, forks, downloads."""

from __future__ import annotations

from django.conf import settings
from django.http import FileResponse, HttpResponseRedirect
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import PageFilter, page_response, query_filters
from api.parsers import PayloadTooLarge
from api.schema import paginated
from api.serializers import ErrorSerializer, StrictSerializer
from api.tenancy import tenant_of
from env_registry import services
from env_registry.archive import ArchiveError, read_capped
from env_registry.models import EnvironmentPackage, EnvironmentVersion, Visibility
from env_registry.readme import render_readme
from env_registry.selectors import (
    SORTS,
    package_forked_from_ref,
    package_get,
    package_starred_by,
    package_visible_list,
    version_get,
    version_list,
)
from env_registry.visibility import Viewer
from portal import storage
from portal.errors import NotFound
from portal.models import Scope


def viewer_of(request) -> Viewer:
    """The caller as the registry sees them: their organization and their current role there (a token acts
    as its owner)."""
    return Viewer.of(tenant_of(request).membership)


class EnvironmentSerializer(serializers.ModelSerializer):
    """A package as listed: version strings only."""

    owner = serializers.CharField(source="organization.slug")
    latest_version = serializers.SerializerMethodField()
    versions = serializers.SerializerMethodField()
    tags = serializers.ListField(child=serializers.CharField())
    stars = serializers.IntegerField(source="star_count", read_only=True)

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
            "stars",
            "usage_count",
            "updated_at",
        ]

    def get_versions(self, obj) -> list[str]:
        return [v.version for v in version_list(obj)]

    def get_latest_version(self, obj) -> str | None:
        valid = [v.version for v in version_list(obj) if v.status == "valid"]
        return valid[0] if valid else None


class EnvironmentVersionSerializer(serializers.ModelSerializer):
    manifest = serializers.JSONField()
    uploaded_by = serializers.SerializerMethodField()

    class Meta:
        model = EnvironmentVersion
        fields = [
            "version",
            "status",
            "validation_error",
            "sha256",
            "size_bytes",
            "manifest",
            "uploaded_by",
            "created_at",
            "validated_at",
        ]

    def get_uploaded_by(self, obj) -> str | None:
        # Who published is the publisher's organization's business, not the marketplace's.
        viewer = self.context.get("viewer")
        if obj.uploaded_by is None or viewer is None or obj.package.organization_id != viewer.organization.pk:
            return None
        return obj.uploaded_by.username


class EnvironmentDetailSerializer(EnvironmentSerializer):
    """A package with its versions in full and its README (raw, and rendered as escaped HTML)."""

    versions = serializers.SerializerMethodField()
    readme = serializers.CharField()
    readme_html = serializers.SerializerMethodField()
    starred = serializers.SerializerMethodField()
    forked_from = serializers.SerializerMethodField()

    class Meta(EnvironmentSerializer.Meta):
        fields = [*EnvironmentSerializer.Meta.fields, "readme", "readme_html", "starred", "forked_from"]

    @extend_schema_field(EnvironmentVersionSerializer(many=True))
    def get_versions(self, obj) -> list[dict]:
        return EnvironmentVersionSerializer(version_list(obj), many=True, context=self.context).data

    def get_readme_html(self, obj) -> str:
        return render_readme(obj.readme)

    def get_starred(self, obj) -> bool:
        user = self.context.get("user")
        return bool(user) and package_starred_by(obj, user)

    def get_forked_from(self, obj) -> str | None:
        viewer = self.context.get("viewer")
        return package_forked_from_ref(obj, viewer) if viewer is not None else None


def _detail(request, package: EnvironmentPackage, code: int = 200) -> Response:
    viewer = viewer_of(request)
    # Re-read through the selector so the star count annotation is present.
    package = package_get(viewer, owner=package.organization.slug, name=package.name)
    context = {"viewer": viewer, "user": request.user}
    return Response(EnvironmentDetailSerializer(package, context=context).data, status=code)


class EnvironmentListApi(APIView):
    read_scope = Scope.ENVS_READ
    write_scope = Scope.ENVS_WRITE
    parser_classes = [MultiPartParser]

    class EnvironmentListFilter(PageFilter):
        q = serializers.CharField(required=False, max_length=100)
        tag = serializers.CharField(required=False, max_length=32)
        sort = serializers.ChoiceField(required=False, choices=sorted(SORTS))

    class UploadInput(serializers.Serializer):
        archive = serializers.FileField(help_text="The package as .tar.gz, holding opentinker.json.")
        visibility = serializers.ChoiceField(choices=Visibility.choices, required=False)

    @extend_schema(
        operation_id="envs_list",
        parameters=[EnvironmentListFilter],
        responses={200: paginated(EnvironmentSerializer)},
        description="Your organization's packages (a private one only to its publishers and the "
        "organization's admins) and everyone's public ones. `q` searches names, "
        "descriptions, owners and tags; `sort` is stars, usage, recent or name (the default).",
    )
    def get(self, request):
        d = query_filters(request, self.EnvironmentListFilter)
        qs = package_visible_list(
            viewer_of(request), q=d.get("q", ""), tag=d.get("tag", ""), sort=d.get("sort", "name")
        )
        return page_response(self, request, qs, EnvironmentSerializer)

    @extend_schema(
        operation_id="envs_upload",
        request={"multipart/form-data": UploadInput},
        responses={201: EnvironmentDetailSerializer, 404: ErrorSerializer, 409: ErrorSerializer},
        description="Publish a new version (multipart: `archive`, optional `visibility`). The manifest "
        "inside the archive names the package and version; versions are immutable (409). The package is "
        "validated in the sandbox before jobs may use it: see each version's `status` and "
        "`validation_error`.",
    )
    def post(self, request):
        tenant = tenant_of(request)
        form = self.UploadInput(data=request.data)
        form.is_valid(raise_exception=True)
        upload = form.validated_data["archive"]
        limit = settings.ENV_ARCHIVE_MAX_BYTES
        try:
            data, sha256 = read_capped(upload.chunks(), limit=limit)
        except ArchiveError as e:
            raise PayloadTooLarge(str(e)) from None
        version = services.version_upload(
            organization=tenant.organization,
            user=request.user,
            data=data,
            sha256=sha256,
            visibility=form.validated_data.get("visibility"),
            viewer=viewer_of(request),
        )
        return _detail(request, version.package, status.HTTP_201_CREATED)


class EnvironmentDetailApi(APIView):
    read_scope = Scope.ENVS_READ
    write_scope = Scope.ENVS_WRITE

    class PatchInput(StrictSerializer):
        description = serializers.CharField(required=False, allow_blank=True, max_length=500)
        visibility = serializers.ChoiceField(choices=Visibility.choices, required=False)
        tags = serializers.ListField(
            child=serializers.CharField(max_length=32), required=False, max_length=16
        )

    @extend_schema(operation_id="envs_get", responses={200: EnvironmentDetailSerializer})
    def get(self, request, owner: str, name: str):
        package = package_get(viewer_of(request), owner=owner, name=name)
        return _detail(request, package)

    @extend_schema(
        operation_id="envs_update",
        request=PatchInput,
        responses={200: EnvironmentDetailSerializer},
        description="Change a package of your organization: description, visibility, tags (its "
        "organization's admins and owners; a member gets 403).",
    )
    def patch(self, request, owner: str, name: str):
        viewer = viewer_of(request)
        body = self.PatchInput(data=request.data)
        body.is_valid(raise_exception=True)
        package = package_get(viewer, owner=owner, name=name)
        services.package_update(package, viewer=viewer, **body.validated_data)
        return _detail(request, package)


class StarOutput(serializers.Serializer):
    starred = serializers.BooleanField()
    stars = serializers.IntegerField()


class EnvironmentStarApi(APIView):
    write_scope = Scope.ENVS_WRITE

    @extend_schema(operation_id="envs_star", request=None, responses={200: StarOutput})
    def put(self, request, owner: str, name: str):
        package = package_get(viewer_of(request), owner=owner, name=name)
        return Response(
            {"starred": True, "stars": services.star_set(package, user=request.user, starred=True)}
        )

    @extend_schema(operation_id="envs_unstar", request=None, responses={200: StarOutput})
    def delete(self, request, owner: str, name: str):
        package = package_get(viewer_of(request), owner=owner, name=name)
        stars = services.star_set(package, user=request.user, starred=False)
        return Response({"starred": False, "stars": stars})


class EnvironmentForkApi(APIView):
    write_scope = Scope.ENVS_WRITE

    class ForkInput(StrictSerializer):
        name = serializers.CharField(required=False, max_length=64)

    @extend_schema(
        operation_id="envs_fork",
        request=ForkInput,
        responses={201: EnvironmentDetailSerializer, 409: ErrorSerializer},
        description="Copy the newest valid version into your organization as a new private package.",
    )
    def post(self, request, owner: str, name: str):
        body = self.ForkInput(data=request.data)
        body.is_valid(raise_exception=True)
        fork = services.package_fork(
            viewer=viewer_of(request),
            owner=owner,
            name=name,
            new_name=body.validated_data.get("name"),
        )
        return _detail(request, fork, status.HTTP_201_CREATED)


class EnvironmentArchiveApi(APIView):
    read_scope = Scope.ENVS_READ

    @extend_schema(
        operation_id="envs_archive",
        responses={
            (200, "application/gzip"): OpenApiResponse(OpenApiTypes.BINARY, description="The archive."),
            302: OpenApiResponse(description="Redirect to a short-lived signed URL (S3)."),
        },
    )
    def get(self, request, owner: str, name: str, version: str):
        package = package_get(viewer_of(request), owner=owner, name=name)
        v = version_get(package, version)
        if not v.archive_uri:
            raise NotFound(f"{owner}/{name}@{version} is a built-in and has no archive")
        filename = f"{package.name}-{v.version}.tar.gz"
        if v.archive_uri.startswith("s3://"):
            return HttpResponseRedirect(storage.presigned_url(v.archive_uri))
        response = FileResponse(
            storage.local_path(v.archive_uri).open("rb"), as_attachment=True, filename=filename
        )
        response["X-Checksum-Sha256"] = v.sha256
        return response
