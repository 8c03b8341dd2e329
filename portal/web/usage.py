"""The organization's usage and quota page: this month's GPU- and CPU-hours against the quota, per job."""

from __future__ import annotations

from datetime import datetime

from django import forms
from django.shortcuts import render
from django.utils import timezone

from portal.models import Quota
from portal.selectors.jobs import job_list
from portal.selectors.usage import job_usage_for_month, organization_usage
from portal.services.usage import month_start
from portal.web.tenancy import org_page


class MonthForm(forms.Form):
    month = forms.CharField(
        label="Month", required=False, widget=forms.DateInput(attrs={"type": "month"}), max_length=7
    )

    def clean_month(self):
        raw = self.cleaned_data["month"]
        if not raw:
            return month_start(timezone.now())
        try:
            return datetime.strptime(raw, "%Y-%m").date()
        except ValueError:
            raise forms.ValidationError("Use the form 2026-01.") from None


def parse_month(request) -> tuple[MonthForm, object]:
    """The month asked for (default: this month, UTC) and the form that shows it; shared with the console."""
    form = MonthForm(request.GET or None)
    month = month_start(timezone.now())
    if form.is_bound and form.is_valid():
        month = form.cleaned_data["month"]
    return form, month


def percent(used: float, limit: float | None) -> float | None:
    if not limit:
        return None
    return round(100 * used / limit, 1)


@org_page
def usage_page(request):
    org = request.membership.organization
    form, month = parse_month(request)
    quota = Quota.objects.get(organization=org)
    months = organization_usage(org, months=12)
    current = month_start(timezone.now())
    this = next((m for m in months if m.month == month), None)
    gpu_hours = this.gpu_hours if this else 0.0
    cpu_hours = this.cpu_hours if this else 0.0
    waiting = job_list(org, state=["queued", "admitted"]).count()
    context = {
        "organization": org,
        "form": form,
        "month": month,
        "is_current": month == current,
        "quota": quota,
        "gpu_hours": gpu_hours,
        "cpu_hours": cpu_hours,
        "gpu_percent": percent(gpu_hours, quota.gpu_hours_per_month) if month == current else None,
        "running_gpus": months[0].running_gpus if months and months[0].month == current else 0,
        "waiting": waiting,
        "jobs": job_usage_for_month(org, month),
        "months": months,
    }
    return render(request, "portal/usage/usage.html", context)
