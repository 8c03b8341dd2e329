"""Audit log pages: an organization's admins read their organization's entries (Team → Audit log), platform
staff read every entry in the admin console; both download the filtered entries as CSV or JSON Lines.

The rows are the API's (portal.selectors.audit); a member without org:admin gets the 403 page, and the
console's pages are a 404 to anyone who is not staff (portal.web.console.staff_page).
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from django import forms
from django.core.paginator import Paginator
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from portal.models import AuditAction, Scope
from portal.selectors.audit import EXPORT_FORMATS, audit_export, audit_list, audit_list_all, audit_row
from portal.web.console import staff_page
from portal.web.tenancy import org_page, require_scope

PAGE_SIZE = 100
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}
_LOCAL = forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M")


class AuditFilterForm(forms.Form):
    action = forms.ChoiceField(label="Action", required=False, choices=[("", "Any"), *AuditAction.choices])
    actor = forms.CharField(label="By (username)", required=False, max_length=150)
    since = forms.DateTimeField(label="From (UTC)", required=False, widget=_LOCAL)
    until = forms.DateTimeField(label="Until (UTC)", required=False, widget=_LOCAL)

    def clean(self):
        data = super().clean()
        if data.get("since") and data.get("until") and data["since"] >= data["until"]:
            self.add_error("since", "must be before Until")
        return data

    def filters(self) -> dict:
        d = self.cleaned_data
        return {k: d[k] for k in ("action", "actor", "since", "until") if d.get(k)}


class ConsoleAuditFilterForm(AuditFilterForm):
    organization = forms.SlugField(label="Organization", required=False, max_length=40)


def _query(form: forms.Form) -> str:
    return urlencode({k: v for k, v in form.data.items() if k in form.fields and v})


def _row(entry) -> dict:
    row = audit_row(entry)
    row["details_json"] = (
        json.dumps(row["details"], sort_keys=True, cls=DjangoJSONEncoder) if row["details"] else ""
    )
    return row


def _page(request, form, qs, *, console: bool):
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    context = {
        "form": form,
        "page": page,
        "rows": [_row(e) for e in page.object_list],
        "query": _query(form),
        "console": console,
        "section": "audit",
        "formats": EXPORT_FORMATS,
    }
    return render(request, "portal/audit.html", context, status=400 if form.errors else 200)


def _download(request, form, qs, name: str):
    fmt = request.GET.get("as", "csv")
    if fmt not in EXPORT_FORMATS:
        message = f"as= must be one of {', '.join(EXPORT_FORMATS)}"
        return HttpResponseBadRequest(message, content_type="text/plain")
    if form.errors:
        return _page(request, form, qs.none(), console=isinstance(form, ConsoleAuditFilterForm))
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response = StreamingHttpResponse(
        audit_export(qs.iterator(chunk_size=2000), fmt), content_type=MEDIA_TYPES[fmt]
    )
    response["Content-Disposition"] = f'attachment; filename="{name}-audit-{stamp}.{fmt}"'
    response["Cache-Control"] = "no-store"
    return response


def _org_entries(request):
    require_scope(request, Scope.ORG_ADMIN, "read the audit log")
    form = AuditFilterForm(request.GET)
    filters = form.filters() if form.is_valid() else {}
    qs = audit_list(request.organization, **filters)
    return form, (qs if form.is_valid() else qs.none())


@require_GET
@org_page
def team_audit(request):
    form, qs = _org_entries(request)
    return _page(request, form, qs, console=False)


@require_GET
@org_page
def team_audit_export(request):
    form, qs = _org_entries(request)
    return _download(request, form, qs, request.organization.slug)


def _all_entries(request):
    form = ConsoleAuditFilterForm(request.GET)
    if not form.is_valid():
        return form, audit_list_all().none()
    organization = form.cleaned_data.get("organization") or None
    return form, audit_list_all(organization_slug=organization, **form.filters())


@staff_page
@require_GET
def console_audit(request):
    form, qs = _all_entries(request)
    return _page(request, form, qs, console=True)


@staff_page
@require_GET
def console_audit_export(request):
    form, qs = _all_entries(request)
    return _download(request, form, qs, "platform")
