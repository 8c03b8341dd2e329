"""The caller, their organization, its quota, members and invitations."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import page_response
from api.schema import paginated
from api.serializers import ErrorSerializer, StrictSerializer
from api.tenancy import tenant_of
from portal.models import Invitation, Membership, Organization, Quota, Role, Scope
from portal.selectors.orgs import (
    invitation_get,
    invitation_list,
    member_get,
    member_list,
    membership_list_for_user,
)
from portal.services.orgs import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_remove,
    membership_set_role,
    organization_create,
)
from portal.services.quotas import QUOTA_FIELDS


class OrgRefSerializer(serializers.ModelSerializer):
    class Meta:
        model = Organization
        fields = ["slug", "name"]


class MeSerializer(serializers.Serializer):
    username = serializers.CharField()
    email = serializers.EmailField()
    is_staff = serializers.BooleanField()
    organization = OrgRefSerializer()
    role = serializers.ChoiceField(choices=Role.choices)
    scopes = serializers.ListField(child=serializers.CharField())
    organizations = OrgRefSerializer(many=True, help_text="Every organization the user belongs to.")


class MeApi(APIView):
    @extend_schema(operation_id="me", responses={200: MeSerializer})
    def get(self, request):
        tenant = tenant_of(request)
        user = request.user
        orgs = [m.organization for m in membership_list_for_user(user)]
        if tenant.token is not None:
            orgs = [tenant.organization]  # a token sees only the organization it is bound to
        return Response(
            MeSerializer(
                {
                    "username": user.get_username(),
                    "email": user.email,
                    "is_staff": user.is_staff,
                    "organization": tenant.organization,
                    "role": tenant.membership.role,
                    "scopes": sorted(tenant.scopes),
                    "organizations": orgs,
                }
            ).data
        )


class OrgSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField()

    class Meta:
        model = Organization
        fields = ["slug", "name", "role", "created_at"]

    def get_role(self, obj) -> str:
        return self.context["role"]


class OrgApi(APIView):
    @extend_schema(operation_id="org_get", responses={200: OrgSerializer})
    def get(self, request):
        tenant = tenant_of(request)
        return Response(OrgSerializer(tenant.organization, context={"role": tenant.membership.role}).data)


class OrgCreateApi(APIView):
    class OrgCreateInput(StrictSerializer):
        slug = serializers.CharField(max_length=40)
        name = serializers.CharField(max_length=100)

    @extend_schema(
        operation_id="orgs_create",
        request=OrgCreateInput,
        responses={201: OrgRefSerializer, 409: ErrorSerializer},
        description="Create an organization with the caller as its owner (browser sessions only).",
    )
    def post(self, request):
        if not request.user.is_authenticated:
            raise PermissionDenied()
        if request.auth is not None:
            raise PermissionDenied("organizations are created from a signed-in browser session, not a token")
        s = self.OrgCreateInput(data=request.data)
        s.is_valid(raise_exception=True)
        org = organization_create(owner=request.user, **s.validated_data)
        return Response(OrgRefSerializer(org).data, status=status.HTTP_201_CREATED)


class QuotaSerializer(serializers.ModelSerializer):
    allowed_pools = serializers.ListField(child=serializers.CharField(max_length=64), max_length=100)

    class Meta:
        model = Quota
        fields = [*QUOTA_FIELDS, "updated_at"]
        read_only_fields = ["updated_at"]


class OrgQuotaApi(APIView):
    @extend_schema(operation_id="org_quota", responses={200: QuotaSerializer})
    def get(self, request):
        return Response(QuotaSerializer(tenant_of(request).organization.quota).data)


class MemberSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username")
    email = serializers.EmailField(source="user.email")
    joined_at = serializers.DateTimeField(source="created_at")

    class Meta:
        model = Membership
        fields = ["id", "username", "email", "role", "joined_at"]


class MemberListApi(APIView):
    @extend_schema(operation_id="members_list", responses={200: paginated(MemberSerializer)})
    def get(self, request):
        return page_response(self, request, member_list(tenant_of(request).organization), MemberSerializer)


class MemberDetailApi(APIView):
    write_scope = Scope.ORG_ADMIN

    class MemberRoleInput(StrictSerializer):
        role = serializers.ChoiceField(choices=Role.choices)

    @extend_schema(operation_id="members_get", responses={200: MemberSerializer})
    def get(self, request, member_id: int):
        return Response(MemberSerializer(member_get(tenant_of(request).organization, member_id)).data)

    @extend_schema(
        operation_id="members_set_role",
        request=MemberRoleInput,
        responses={200: MemberSerializer, 409: ErrorSerializer},
        description="409 when it would leave the organization without an owner.",
    )
    def patch(self, request, member_id: int):
        tenant = tenant_of(request)
        target = member_get(tenant.organization, member_id)
        s = self.MemberRoleInput(data=request.data)
        s.is_valid(raise_exception=True)
        target = membership_set_role(by=tenant.membership, target=target, role=s.validated_data["role"])
        return Response(MemberSerializer(target).data)

    @extend_schema(
        operation_id="members_remove",
        responses={204: None, 409: ErrorSerializer},
        description="Remove a member (or leave, with your own id); 409 for the last owner.",
    )
    def delete(self, request, member_id: int):
        tenant = tenant_of(request)
        membership_remove(by=tenant.membership, target=member_get(tenant.organization, member_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationSerializer(serializers.ModelSerializer):
    invited_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Invitation
        fields = ["id", "email", "role", "invited_by", "created_at", "expires_at"]


class CreatedInvitationSerializer(InvitationSerializer):
    accept_token = serializers.CharField(help_text="Give this to the invitee; shown only once.")

    class Meta(InvitationSerializer.Meta):
        fields = [*InvitationSerializer.Meta.fields, "accept_token"]


class InvitationListApi(APIView):
    read_scope = Scope.ORG_ADMIN
    write_scope = Scope.ORG_ADMIN

    class InvitationCreateInput(StrictSerializer):
        email = serializers.EmailField(max_length=254)
        role = serializers.ChoiceField(choices=Role.choices, default=Role.MEMBER)

    @extend_schema(operation_id="invitations_list", responses={200: paginated(InvitationSerializer)})
    def get(self, request):
        invitations = invitation_list(tenant_of(request).organization)
        return page_response(self, request, invitations, InvitationSerializer)

    @extend_schema(
        operation_id="invitations_create",
        request=InvitationCreateInput,
        responses={201: CreatedInvitationSerializer, 409: ErrorSerializer},
        description="Invite an e-mail address to a role up to your own; 409 when it is already a member's.",
    )
    def post(self, request):
        tenant = tenant_of(request)
        s = self.InvitationCreateInput(data=request.data)
        s.is_valid(raise_exception=True)
        invitation, secret = invitation_create(by=tenant.membership, **s.validated_data)
        data = InvitationSerializer(invitation).data | {"accept_token": secret}
        return Response(data, status=status.HTTP_201_CREATED)


class InvitationDetailApi(APIView):
    write_scope = Scope.ORG_ADMIN

    @extend_schema(operation_id="invitations_revoke", responses={204: None})
    def delete(self, request, invitation_id: int):
        tenant = tenant_of(request)
        invitation_revoke(by=tenant.membership, invitation=invitation_get(tenant.organization, invitation_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationAcceptApi(APIView):
    class InvitationAcceptInput(StrictSerializer):
        token = serializers.CharField(max_length=100)

    @extend_schema(
        operation_id="invitations_accept",
        request=InvitationAcceptInput,
        responses={201: OrgRefSerializer, 404: ErrorSerializer, 409: ErrorSerializer},
        description="Join the organization of an invitation sent to the signed-in user's e-mail address.",
    )
    def post(self, request):
        if request.auth is not None:
            raise PermissionDenied("invitations are accepted from a signed-in browser session, not a token")
        s = self.InvitationAcceptInput(data=request.data)
        s.is_valid(raise_exception=True)
        membership = invitation_accept(secret=s.validated_data["token"], user=request.user)
        return Response(OrgRefSerializer(membership.organization).data, status=status.HTTP_201_CREATED)
