"""Environments marketplace pages: browse and search, a package's page, publish a version, star, fork, and
the package's settings (description, visibility, tags) for its organization's admins.

Reads go through env_registry.selectors from the current organization's point of view, so another
organization's private package is a 404 here exactly as in the API; writes go through env_registry.services.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from env_registry import services
from env_registry.archive import ArchiveError, read_capped
from env_registry.models import EnvironmentPackage, Visibility
from env_registry.readme import render_readme
from env_registry.selectors import (
    SORTS,
    package_forked_from_ref,
    package_get,
    package_starred_by,
    package_visible_list,
    version_list,
)
from env_registry.visibility import Viewer, package_may_change
from portal.errors import DomainError
from portal.models import Scope
from portal.web.forms import add_domain_error
from portal.web.tenancy import org_page, page_scopes, require_scope

PAGE_SIZE = 25
# What a multipart form adds around the archive (boundaries, other fields): refused before reading above it.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
SORT_LABELS = {"name": "Name", "stars": "Most stars", "usage": "Most used", "recent": "Recently updated"}


def viewer_of(request) -> Viewer:
    """The signed-in user in the current organization, with their role there."""
    return Viewer.of(request.membership)


class SearchForm(forms.Form):
    q = forms.CharField(label="Search", required=False, max_length=100)
    tag = forms.CharField(label="Tag", required=False, max_length=32)
    sort = forms.ChoiceField(
        label="Sort by", required=False, choices=[(k, SORT_LABELS[k]) for k in sorted(SORTS)]
    )


class PublishForm(forms.Form):
    archive = forms.FileField(
        label="Package archive (.tar.gz with opentinker.json)",
        widget=forms.ClearableFileInput(attrs={"accept": ".tar.gz,.tgz,application/gzip"}),
    )
    visibility = forms.ChoiceField(
        label="Visibility",
        required=False,
        choices=[("", "Keep (private for a new package)"), *Visibility.choices],
    )


class ForkForm(forms.Form):
    name = forms.RegexField(
        label="Name in your organization",
        required=False,
        max_length=64,
        regex=r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$",
        error_messages={"invalid": "1-64 lowercase letters, digits, '-' or '_'"},
    )


MAX_TAGS = 16  # as the API's PATCH


class SettingsForm(forms.Form):
    description = forms.CharField(
        label="Description",
        required=False,
        max_length=EnvironmentPackage._meta.get_field("description").max_length,
        widget=forms.Textarea(attrs={"rows": 3}),
    )
    visibility = forms.ChoiceField(
        label="Visibility",
        choices=Visibility.choices,
        help_text="Private: its publishers and this organization's admins. Organization: every member. "
        "Public: everyone, in the marketplace.",
    )
    tags = forms.CharField(
        label="Tags (comma-separated)",
        required=False,
        max_length=MAX_TAGS * 33,
        help_text="Lowercase letters, digits and '-', for example: games, multi-turn",
    )

    @classmethod
    def for_package(cls, package: EnvironmentPackage) -> SettingsForm:
        initial = {
            "description": package.description,
            "visibility": package.visibility,
            "tags": ", ".join(package.tags),
        }
        return cls(initial=initial)

    def clean_tags(self) -> list[str]:
        tags = [t.strip() for t in self.cleaned_data["tags"].split(",") if t.strip()]
        if len(tags) > MAX_TAGS:
            raise forms.ValidationError(f"at most {MAX_TAGS} tags")
        return tags


MANIFEST_ORDER = ("name", "version", "entrypoint", "protocol", "roles", "description", "tags", "license")


def manifest_rows(manifest: dict) -> list[tuple[str, str]]:
    """The manifest's fields in a reader's order, lists joined: what the package page shows."""
    keys = [k for k in MANIFEST_ORDER if k in manifest] + sorted(set(manifest) - set(MANIFEST_ORDER))
    return [
        (k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
        for k, v in ((k, manifest[k]) for k in keys)
    ]


def _latest_valid(package: EnvironmentPackage) -> str | None:
    valid = [v.version for v in version_list(package) if v.status == "valid"]
    return valid[0] if valid else None


@org_page
def env_list(request):
    form = SearchForm(request.GET or None)
    q = tag = ""
    sort = "name"
    if form.is_bound and form.is_valid():
        q, tag = form.cleaned_data["q"].strip(), form.cleaned_data["tag"].strip()
        sort = form.cleaned_data["sort"] or "name"
    qs = package_visible_list(viewer_of(request), q=q, tag=tag, sort=sort)
    # get_page: a page number past the end or not a number shows the nearest page instead of an error.
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [{"package": p, "latest": _latest_valid(p)} for p in page]
    query = urlencode({"q": q, "tag": tag, "sort": sort})
    context = {"form": form, "rows": rows, "q": q, "tag": tag, "sort": sort, "page": page, "query": query}
    return render(request, "portal/envs/list.html", context)


def _detail_context(request, package: EnvironmentPackage) -> dict:
    org = request.membership.organization
    mine = package.organization_id == org.pk
    versions = version_list(package)
    latest = next((v for v in versions if v.status == "valid"), None)
    return {
        "package": package,
        "owner": package.organization.slug,
        "mine": mine,
        "versions": versions,
        "latest": latest,
        "manifest": manifest_rows(latest.manifest) if latest else [],
        "readme_html": render_readme(package.readme),
        "starred": package_starred_by(package, request.user),
        "forked_from": package_forked_from_ref(package, viewer_of(request)),
        "forks": package.forks.count(),
        "can_write": Scope.ENVS_WRITE in page_scopes(request),
        "can_change": package_may_change(package, viewer_of(request)),
        "show_uploader": mine,
    }


@org_page
def env_detail(request, owner: str, name: str):
    package = package_get(viewer_of(request), owner=owner, name=name)
    context = _detail_context(request, package)
    context |= {"fork_form": ForkForm(), "settings_form": SettingsForm.for_package(package)}
    return render(request, "portal/envs/detail.html", context)


@org_page
@require_POST
def env_settings(request, owner: str, name: str):
    """Save the package's settings: a package the user cannot see is a 404, one of their organization that
    they may not change a 403 saying why (the service decides both), bad input the page again with the
    errors next to their fields and nothing saved."""
    viewer = viewer_of(request)
    package = package_get(viewer, owner=owner, name=name)
    services.package_settings_check(viewer, package)
    form = SettingsForm(request.POST)
    if form.is_valid():
        try:
            services.package_update(package, viewer=viewer, **form.cleaned_data)
        except DomainError as e:
            add_domain_error(form, e)
        else:
            messages.success(request, f"Settings of {owner}/{name} saved.")
            return redirect("env_detail", owner=owner, name=name)
    package = package_get(viewer, owner=owner, name=name)  # unchanged, with its star count
    context = _detail_context(request, package) | {"fork_form": ForkForm(), "settings_form": form}
    return render(request, "portal/envs/detail.html", context, status=400)


@org_page
@require_http_methods(["GET", "POST"])
def env_publish(request):
    org = request.membership.organization
    if request.method == "GET":
        return render(request, "portal/envs/publish.html", {"form": PublishForm()})
    require_scope(request, Scope.ENVS_WRITE, "publish environments")
    limit = settings.ENV_ARCHIVE_MAX_BYTES
    # Refuse an oversized upload by its declared length, before Django reads (and spools) the body.
    if int(request.META.get("CONTENT_LENGTH") or 0) > limit + MULTIPART_OVERHEAD_BYTES:
        form = PublishForm(data={})
        form.is_valid()
        form.errors.clear()  # only the size matters: the body is not read
        form.add_error("archive", f"archive is over the {limit // (1024 * 1024)} MB limit")
        return render(request, "portal/envs/publish.html", {"form": form}, status=413)
    form = PublishForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            data, sha256 = read_capped(form.cleaned_data["archive"].chunks(), limit=limit)
            version = services.version_upload(
                organization=org,
                user=request.user,
                data=data,
                sha256=sha256,
                visibility=form.cleaned_data["visibility"] or None,
                viewer=viewer_of(request),
            )
        except ArchiveError as e:
            form.add_error("archive", str(e))
        except DomainError as e:
            add_domain_error(form, e, fields={"version": "archive"})
        else:
            return redirect("env_detail", owner=org.slug, name=version.package.name)
    return render(request, "portal/envs/publish.html", {"form": form}, status=400)


@org_page
@require_POST
def env_star(request, owner: str, name: str):
    package = package_get(viewer_of(request), owner=owner, name=name)
    require_scope(request, Scope.ENVS_WRITE, "star environments")
    starred = request.POST.get("starred") == "1"
    stars = services.star_set(package, user=request.user, starred=starred)
    if request.headers.get("HX-Request"):
        context = {"package": package, "owner": owner, "starred": starred, "stars": stars, "can_write": True}
        return render(request, "portal/envs/_star.html", context)
    return redirect("env_detail", owner=owner, name=name)


@org_page
@require_POST
def env_fork(request, owner: str, name: str):
    org, viewer = request.membership.organization, viewer_of(request)
    package = package_get(viewer, owner=owner, name=name)
    require_scope(request, Scope.ENVS_WRITE, "fork environments")
    form = ForkForm(request.POST)
    if form.is_valid():
        try:
            fork = services.package_fork(
                viewer=viewer,
                owner=owner,
                name=name,
                new_name=form.cleaned_data["name"] or None,
            )
        except DomainError as e:
            add_domain_error(form, e)
        else:
            return redirect("env_detail", owner=org.slug, name=fork.name)
    package = package_get(viewer, owner=owner, name=name)  # with its star count
    context = _detail_context(request, package) | {"fork_form": form}
    return render(request, "portal/envs/detail.html", context, status=400)
