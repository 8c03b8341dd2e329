"""Create an organization; switch the organization the session works in."""

from __future__ import annotations

import re

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from portal.errors import DomainError
from portal.selectors.orgs import membership_list_for_user
from portal.services.orgs import organization_create
from portal.web.forms import add_domain_error
from portal.web.tenancy import select_organization


class OrganizationForm(forms.Form):
    name = forms.CharField(max_length=100)
    slug = forms.SlugField(
        label="Organization id",
        max_length=40,
        help_text="Lowercase letters, digits and dashes; used in URLs and environment names.",
    )


@login_required
@require_http_methods(["GET", "POST"])
def org_create(request):
    form = OrganizationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            org = organization_create(
                slug=form.cleaned_data["slug"], name=form.cleaned_data["name"], owner=request.user
            )
        except DomainError as e:
            add_domain_error(form, e)
        else:
            select_organization(request, membership_list_for_user(request.user).get(organization=org))
            messages.success(request, f"Created {org.name}; you are its owner and are now working in it.")
            return redirect("home")
    return render(request, "portal/orgs/create.html", {"form": form}, status=400 if form.errors else 200)


@login_required
@require_POST
def org_switch(request):
    # Only organizations the user belongs to: any other slug is "not found", never a hint that it exists.
    membership = (
        membership_list_for_user(request.user)
        .filter(organization__slug=request.POST.get("organization", "")[:40])
        .first()
    )
    if membership is None:
        messages.error(request, "You are not a member of that organization.")
    else:
        select_organization(request, membership)
        messages.success(request, f"Now working in {membership.organization.name}.")
    target = request.POST.get("next") or "/"
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = "/"
    # An object page of the previous organization would be a 404 in the new one: go to the section's list.
    return redirect(_section_of(target))


def _section_of(path: str) -> str:
    first = path.strip("/").split("/", 1)[0]
    # Only a plain section name: never something a browser could read as another host ("/\\evil").
    return f"/{first}/" if re.fullmatch(r"[a-z][a-z-]{0,30}", first) else "/"
