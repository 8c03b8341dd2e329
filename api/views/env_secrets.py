"""Environment secrets of the current organization: create, list, delete (org:admin). No route ever returns a
value, not even the one that created it: the caller already has it (portal/services/env_secrets.py)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import page_response
from api.schema import paginated
from api.serializers import ErrorSerializer, StrictSerializer
from api.tenancy import tenant_of
from portal.models import EnvironmentSecret, Scope
from portal.services.env_secrets import (
    MAX_VALUE_BYTES,
    NAME_RE,
    environment_secret_create,
    environment_secret_delete,
    environment_secret_get,
    environment_secret_list,
)

NAME_RULE = "a secret name is 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"


class EnvironmentSecretSerializer(serializers.ModelSerializer):
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = EnvironmentSecret
        fields = ["name", "created_by", "created_at"]  # never the ciphertext, never the value
        read_only_fields = fields


class EnvironmentSecretListApi(APIView):
    read_scope = Scope.ORG_ADMIN
    write_scope = Scope.ORG_ADMIN

    class EnvironmentSecretCreateInput(StrictSerializer):
        name = serializers.RegexField(
            NAME_RE.pattern.removesuffix("$") + r"\Z",
            max_length=63,
            help_text="1-63 characters of a-z, 0-9, `_` and `-`, starting with a letter or digit.",
            error_messages={"invalid": NAME_RULE},
        )
        value = serializers.CharField(
            max_length=MAX_VALUE_BYTES,
            trim_whitespace=False,
            write_only=True,
            help_text=f"At most {MAX_VALUE_BYTES} bytes. Stored encrypted; never shown again.",
        )

    @extend_schema(operation_id="env_secrets_list", responses={200: paginated(EnvironmentSecretSerializer)})
    def get(self, request):
        secrets = environment_secret_list(tenant_of(request).organization)
        return page_response(self, request, secrets, EnvironmentSecretSerializer)

    @extend_schema(
        operation_id="env_secrets_create",
        request=EnvironmentSecretCreateInput,
        responses={201: EnvironmentSecretSerializer, 409: ErrorSerializer},
        description="Store a secret a job can name in `environment.secret` (remote https:// environments); "
        "the runtime sends it as a Bearer token. A name is unique in the organization (409).",
    )
    def post(self, request):
        tenant = tenant_of(request)
        s = self.EnvironmentSecretCreateInput(data=request.data)
        s.is_valid(raise_exception=True)
        secret = environment_secret_create(by=tenant.membership, **s.validated_data)
        return Response(EnvironmentSecretSerializer(secret).data, status=status.HTTP_201_CREATED)


class EnvironmentSecretDetailApi(APIView):
    read_scope = Scope.ORG_ADMIN
    write_scope = Scope.ORG_ADMIN

    @extend_schema(operation_id="env_secrets_delete", responses={204: None})
    def delete(self, request, name: str):
        tenant = tenant_of(request)
        environment_secret_delete(
            by=tenant.membership, secret=environment_secret_get(tenant.organization, name)
        )
        return Response(status=status.HTTP_204_NO_CONTENT)
