"""The audit log: an organization's admins read their organization's entries; platform staff read all.

``GET /api/v1/org/audit`` (org:admin; a teammate with a lesser role gets 403, and nobody ever sees another
organization's entries) and ``GET /api/v1/admin/audit`` (staff; 404 to everyone else), each with an
``/export`` twin that downloads the same filtered rows as CSV or JSON Lines.
"""

from __future__ import annotations

from django.http import StreamingHttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.views import APIView

from api.common import page_response, query_dict
from api.schema import paginated
from api.serializers import StrictSerializer
from api.tenancy import tenant_of
from api.views.admin import StaffOnly
from portal.models import AuditAction, Scope
from portal.selectors.audit import EXPORT_FORMATS, audit_export, audit_list, audit_list_all, audit_row

EXPORT_ITERATOR_CHUNK = 2000
MAX_OFFSET = 2**31 - 1  # beyond what PostgreSQL's OFFSET takes, a 400 rather than a database error


class AuditEntrySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    organization = serializers.CharField(allow_null=True, help_text="Slug; null for platform-wide actions.")
    actor = serializers.CharField(help_text="Who acted: a username (and token), or system.")
    actor_user = serializers.CharField(allow_null=True)
    actor_token = serializers.CharField(allow_null=True, help_text="`otk_<lookup>_…` of the token used.")
    action = serializers.ChoiceField(choices=AuditAction.choices)
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    target_label = serializers.CharField()
    ip = serializers.IPAddressField(allow_null=True)
    user_agent = serializers.CharField()
    details = serializers.JSONField()


class AuditFilter(StrictSerializer):
    action = serializers.ChoiceField(choices=AuditAction.choices, required=False)
    since = serializers.DateTimeField(required=False, help_text="Entries at or after this time (ISO 8601).")
    until = serializers.DateTimeField(required=False, help_text="Entries before this time (ISO 8601).")
    actor = serializers.CharField(required=False, max_length=150, help_text="A username.")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=MAX_OFFSET)
    offset = serializers.IntegerField(required=False, min_value=0, max_value=MAX_OFFSET)

    def validate(self, attrs):
        if "since" in attrs and "until" in attrs and attrs["since"] >= attrs["until"]:
            raise serializers.ValidationError({"since": ["must be before until"]})
        return attrs


class AdminAuditFilter(AuditFilter):
    organization = serializers.SlugField(required=False, max_length=40, help_text="One organization's slug.")


class AuditExportFilter(AuditFilter):
    limit = None  # a download holds every matching entry
    offset = None


class AdminAuditExportFilter(AuditExportFilter):
    organization = serializers.SlugField(required=False, max_length=40)


FILTER_PARAMETERS = [
    OpenApiParameter("action", OpenApiTypes.STR, enum=AuditAction.values, description="One action."),
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="Entries at or after this time."),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="Entries before this time."),
    OpenApiParameter("actor", OpenApiTypes.STR, description="Entries by this username."),
]
PAGE_PARAMETERS = [
    OpenApiParameter("limit", OpenApiTypes.INT, description="Page size (default 50, at most 200)."),
    OpenApiParameter("offset", OpenApiTypes.INT, description="Entries to skip."),
]
ORG_PARAMETER = OpenApiParameter("organization", OpenApiTypes.STR, description="One organization's slug.")
EXPORT_PARAMETER = OpenApiParameter(
    "as", OpenApiTypes.STR, enum=list(EXPORT_FORMATS), description="csv or jsonl (the default)."
)
_EXPORT_DESCRIPTION = "`as=csv`: a header row, then a row an entry; `as=jsonl`: an AuditEntry object a line."
EXPORT_RESPONSES = {
    (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description=_EXPORT_DESCRIPTION),
    (200, "application/x-ndjson"): OpenApiResponse(OpenApiTypes.STR, description=_EXPORT_DESCRIPTION),
}
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}


def _filters(request, serializer_class, *, export: bool = False) -> tuple[dict, str]:
    """The validated filters (and, for a download, its format: `as`, since DRF keeps `format` for itself)."""
    query = query_dict(request)
    fmt = query.pop("as", "jsonl") if export else ""
    f = serializer_class(data=query)
    f.is_valid(raise_exception=True)
    if export and fmt not in EXPORT_FORMATS:
        raise ValidationError({"as": [f"must be one of {', '.join(EXPORT_FORMATS)}"]})
    d = dict(f.validated_data)
    d.pop("limit", None)
    d.pop("offset", None)
    return d, fmt


def _download(qs, fmt: str, name: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(
        audit_export(qs.iterator(chunk_size=EXPORT_ITERATOR_CHUNK), fmt), content_type=MEDIA_TYPES[fmt]
    )
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="{name}-audit-{stamp}.{fmt}"'
    response["Cache-Control"] = "no-store"
    return response


class OrgAuditListApi(APIView):
    read_scope = Scope.ORG_ADMIN

    @extend_schema(
        operation_id="org_audit_list",
        parameters=[*FILTER_PARAMETERS, *PAGE_PARAMETERS],
        responses={200: paginated(AuditEntrySerializer)},
        description="Security-relevant changes in the caller's organization, newest first (org:admin).",
    )
    def get(self, request):
        organization = tenant_of(request).organization
        d, _ = _filters(request, AuditFilter)
        return page_response(self, request, audit_list(organization, **d), AuditEntrySerializer, audit_row)


class OrgAuditExportApi(APIView):
    read_scope = Scope.ORG_ADMIN

    @extend_schema(
        operation_id="org_audit_export",
        parameters=[*FILTER_PARAMETERS, EXPORT_PARAMETER],
        responses=EXPORT_RESPONSES,
        description="The caller's organization's audit entries (same filters as the list) as a download.",
    )
    def get(self, request):
        organization = tenant_of(request).organization
        d, fmt = _filters(request, AuditExportFilter, export=True)
        return _download(audit_list(organization, **d), fmt, organization.slug)


class AdminAuditListApi(APIView):
    permission_classes = [StaffOnly]

    @extend_schema(
        operation_id="admin_audit_list",
        parameters=[ORG_PARAMETER, *FILTER_PARAMETERS, *PAGE_PARAMETERS],
        responses={200: paginated(AuditEntrySerializer)},
        description="Every organization's audit entries and the platform-wide ones, newest first (staff).",
    )
    def get(self, request):
        d, _ = _filters(request, AdminAuditFilter)
        qs = audit_list_all(organization_slug=d.pop("organization", None), **d)
        return page_response(self, request, qs, AuditEntrySerializer, audit_row)


class AdminAuditExportApi(APIView):
    permission_classes = [StaffOnly]

    @extend_schema(
        operation_id="admin_audit_export",
        parameters=[ORG_PARAMETER, *FILTER_PARAMETERS, EXPORT_PARAMETER],
        responses=EXPORT_RESPONSES,
        description="Every audit entry (same filters as the list) as a download (staff).",
    )
    def get(self, request):
        d, fmt = _filters(request, AdminAuditExportFilter, export=True)
        return _download(audit_list_all(organization_slug=d.pop("organization", None), **d), fmt, "platform")
