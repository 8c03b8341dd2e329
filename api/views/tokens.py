"""API tokens: create (secret shown once), list, show, revoke."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import page_response
from api.schema import paginated
from api.serializers import StrictSerializer
from api.tenancy import tenant_of
from portal.errors import Forbidden
from portal.models import ApiToken, Scope
from portal.selectors.orgs import token_get, token_list
from portal.services.tokens import MAX_EXPIRY_DAYS, token_create, token_revoke


class TokenOutputSerializer(serializers.ModelSerializer):
    user = serializers.SlugRelatedField(slug_field="username", read_only=True)
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=Scope.choices))

    class Meta:
        model = ApiToken
        fields = [
            "id",
            "name",
            "lookup",
            "scopes",
            "user",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
        ]
        read_only_fields = fields


class CreatedTokenSerializer(TokenOutputSerializer):
    token = serializers.CharField(help_text="The secret. Shown only in this response: store it now.")

    class Meta(TokenOutputSerializer.Meta):
        fields = [*TokenOutputSerializer.Meta.fields, "token"]
        read_only_fields = fields


class TokenListApi(APIView):
    # Every member manages their own tokens; what a token may carry is capped by the member's role.
    read_scope = None
    write_scope = None

    class TokenCreateInput(StrictSerializer):
        name = serializers.CharField(max_length=100)
        scopes = serializers.ListField(
            child=serializers.ChoiceField(choices=Scope.choices),
            min_length=1,
            max_length=10,
            error_messages={"min_length": "give at least one scope"},
        )
        expires_in_days = serializers.IntegerField(
            required=False, allow_null=True, min_value=1, max_value=MAX_EXPIRY_DAYS, default=None
        )

    @extend_schema(operation_id="tokens_list", responses={200: paginated(TokenOutputSerializer)})
    def get(self, request):
        tenant = tenant_of(request)
        tokens = token_list(tenant.membership, manage_all=_manages_all(tenant))
        return page_response(self, request, tokens, TokenOutputSerializer)

    @extend_schema(
        operation_id="tokens_create",
        request=TokenCreateInput,
        responses={201: CreatedTokenSerializer},
        description="Create a token for the current organization. Through a token this needs `org:admin`, "
        "and the new token can never hold a scope its creator lacks.",
    )
    def post(self, request):
        tenant = tenant_of(request)
        s = self.TokenCreateInput(data=request.data)
        s.is_valid(raise_exception=True)
        if tenant.token is not None:
            # A token minting tokens is a privilege escalation path: require org:admin and no widening.
            if Scope.ORG_ADMIN not in tenant.scopes:
                raise Forbidden("creating tokens with a token needs the org:admin scope")
            wider = sorted(set(s.validated_data["scopes"]) - tenant.scopes)
            if wider:
                raise Forbidden(
                    f"a token cannot create a token with more scopes: {', '.join(wider)}", field="scopes"
                )
        token, secret = token_create(membership=tenant.membership, **s.validated_data)
        data = TokenOutputSerializer(token).data | {"token": secret}
        return Response(data, status=status.HTTP_201_CREATED)


def _manages_all(tenant) -> bool:
    # Seeing and revoking teammates' tokens is org:admin work, whether through a session or a token.
    return Scope.ORG_ADMIN in tenant.scopes


class TokenDetailApi(APIView):
    read_scope = None
    write_scope = None

    @extend_schema(operation_id="tokens_get", responses={200: TokenOutputSerializer})
    def get(self, request, token_id: int):
        tenant = tenant_of(request)
        token = token_get(tenant.membership, token_id, manage_all=_manages_all(tenant))
        return Response(TokenOutputSerializer(token).data)

    @extend_schema(operation_id="tokens_revoke", responses={204: None})
    def delete(self, request, token_id: int):
        tenant = tenant_of(request)
        manage_all = _manages_all(tenant)
        token = token_get(tenant.membership, token_id, manage_all=manage_all)
        token_revoke(by=tenant.membership, token=token, manage_all=manage_all)
        return Response(status=status.HTTP_204_NO_CONTENT)
