"""Team pages: members and roles, invitations (create, list, revoke) and accepting one by its link.

The rules are the services' (portal.services.orgs), the same the API applies: only admins and owners change
roles, remove others or invite; nobody grants a role above their own; an organization keeps an owner. A
member of another organization is a 404, never a 403.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from portal.errors import DomainError, NotFound
from portal.models import Role
from portal.roles import role_at_least
from portal.selectors.orgs import (
    invitation_for_secret,
    invitation_get,
    invitation_list,
    member_get,
    member_list,
)
from portal.services.orgs import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_remove,
    membership_set_role,
)
from portal.web.forms import add_domain_error
from portal.web.tenancy import SESSION_ORG_KEY, org_page, select_organization


class RoleForm(forms.Form):
    role = forms.ChoiceField(label="Role", choices=Role.choices)


class InviteForm(forms.Form):
    email = forms.EmailField(label="E-mail address", max_length=254)
    role = forms.ChoiceField(label="Role", choices=Role.choices, initial=Role.MEMBER)


class AcceptForm(forms.Form):
    token = forms.CharField(widget=forms.HiddenInput, max_length=100)


def _team(request, *, invite_form=None, created=None, error=None, status=200):
    membership = request.membership
    is_admin = role_at_least(membership.role, Role.ADMIN)
    members = list(member_list(membership.organization))
    rows = [
        {
            "member": m,
            "form": RoleForm(initial={"role": m.role}, auto_id=f"id_member{m.pk}_%s"),
            "is_me": m.pk == membership.pk,
        }
        for m in members
    ]
    context = {
        "organization": membership.organization,
        "me": membership,
        "is_admin": is_admin,
        "rows": rows,
        # Invitations carry e-mail addresses: the API shows them to admins only (org:admin), so does the page.
        "invitations": list(invitation_list(membership.organization).select_related("invited_by"))
        if is_admin
        else [],
        "invite_form": invite_form or InviteForm(),
        "created": created,
        "error": error,
    }
    return render(request, "portal/team/team.html", context, status=status)


def _act(request, action):
    """Run a service call; its refusal (a 404 stays a 404) is shown on the team page with its status."""
    try:
        action()
    except NotFound:
        raise
    except DomainError as e:
        return _team(request, error=e.message, status=e.status)
    return None


@org_page
def team(request):
    return _team(request)


@org_page
@require_POST
def member_role(request, member_id: int):
    target = member_get(request.membership.organization, member_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        return _team(request, error="Pick one of the roles.", status=400)
    role = form.cleaned_data["role"]
    return _act(request, lambda: membership_set_role(by=request.membership, target=target, role=role)) or (
        redirect("team")
    )


@org_page
@require_POST
def member_remove(request, member_id: int):
    target = member_get(request.membership.organization, member_id)
    refused = _act(request, lambda: membership_remove(by=request.membership, target=target))
    if refused:
        return refused
    if target.pk == request.membership.pk:  # left the organization
        request.session.pop(SESSION_ORG_KEY, None)
        return redirect("home")
    return redirect("team")


@org_page
@require_POST
def invitation_new(request):
    form = InviteForm(request.POST)
    if form.is_valid():
        try:
            invitation, secret = invitation_create(by=request.membership, **form.cleaned_data)
        except DomainError as e:
            if e.status == 403:
                return _team(request, error=e.message, status=403)
            add_domain_error(form, e)
        else:
            # The secret is shown this once; only its HMAC is stored.
            link = request.build_absolute_uri(
                reverse("invitation_accept") + "?" + urlencode({"token": secret})
            )
            return _team(request, created={"invitation": invitation, "link": link}, status=201)
    return _team(request, invite_form=form, status=400)


@org_page
@require_POST
def invitation_cancel(request, pk: int):
    invitation = invitation_get(request.membership.organization, pk)
    return _act(request, lambda: invitation_revoke(by=request.membership, invitation=invitation)) or (
        redirect("team")
    )


@login_required
@require_http_methods(["GET", "POST"])
def invitation_join(request):
    """The link in an invitation: GET shows what it is, POST joins (a GET never changes anything).

    The page names the organization and the role offered only to the invited address's account: the
    secret is the capability, and a forwarded link tells its holder nothing but that it is not theirs."""
    form = AcceptForm(request.POST if request.method == "POST" else {"token": request.GET.get("token", "")})
    if not form.is_valid():
        raise Http404
    if request.method == "GET":
        try:
            invitation = invitation_for_secret(form.cleaned_data["token"])
        except NotFound:
            raise Http404 from None
        addressee = (request.user.email or "").lower() == invitation.email
        context = {"form": form, "invitation": invitation if addressee else None, "addressee": addressee}
        return render(request, "portal/team/accept.html", context)
    try:
        membership = invitation_accept(secret=form.cleaned_data["token"], user=request.user)
    except NotFound:
        raise Http404 from None
    except DomainError as e:
        return render(request, "portal/team/accept.html", {"form": form, "error": e.message}, status=e.status)
    select_organization(request, membership)
    return redirect("team")
