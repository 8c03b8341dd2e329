"""The admin console for platform staff: organizations and quotas, pools, the queue, usage per month.

Every URL here answers 404 to anyone who is not active platform staff, signed in or not: nobody else learns
that the console exists (the admin API does the same). Writes go through the services (quota_set,
job_preempt, job_set_priority), which check staff again themselves where they can.
"""

from __future__ import annotations

import re
from functools import wraps

from django import forms
from django.contrib import messages
from django.http import Http404
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from portal.actors import Actor
from portal.errors import DomainError
from portal.selectors.admin import (
    allocation_list_live,
    job_get_any,
    job_list_running,
    organization_get,
    organization_list,
)
from portal.selectors.queue import pool_get, pool_list, queue_explain
from portal.selectors.usage import usage_by_organization
from portal.services.enqueue import enqueue
from portal.services.jobs import PRIORITY_MAX, PRIORITY_MIN, job_set_priority
from portal.services.pools import pool_update
from portal.services.quotas import quota_set
from portal.services.supervision import job_preempt
from portal.web.forms import add_domain_error
from portal.web.usage import parse_month

QUEUE_LIMIT = 500
POOL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def staff_page(view):
    # CSRF is checked here, after the staff check, not by the middleware before the view: otherwise a
    # non-staff POST without a token would get the CSRF 403 and so learn that the URL exists.
    @csrf_exempt
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        user = request.user
        if not (user.is_authenticated and user.is_active and user.is_staff):
            raise Http404
        refused = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
        if refused is not None:
            return refused
        try:
            return view(request, *args, **kwargs)
        except DomainError as e:
            if e.status == 404:
                raise Http404 from None
            messages.error(request, e.message)
            return redirect("console_queue")  # the queue's forms (priority, preempt) are what services refuse

    return wrapper


class QuotaForm(forms.Form):
    # The same bounds as the admin API's quota input (api/views/admin.py) and the model's validators.
    max_gpus = forms.IntegerField(label="Nominal GPUs", min_value=0, max_value=4096)
    borrowing_limit_gpus = forms.IntegerField(
        label="Borrowing limit (GPUs above nominal)", min_value=0, max_value=4096
    )
    gpu_hours_per_month = forms.IntegerField(label="GPU-hours per month", min_value=0, max_value=10_000_000)
    max_queued_jobs = forms.IntegerField(label="Queued jobs at most", min_value=0, max_value=100_000)
    max_cpus_per_job = forms.IntegerField(label="CPUs per job at most", min_value=1, max_value=1024)
    fair_share_weight = forms.FloatField(label="Fair-share weight", min_value=0.01, max_value=1000)
    allowed_pools = forms.CharField(
        label="Allowed pools",
        required=False,
        max_length=6600,
        help_text="Pool names separated by commas; empty means every pool.",
    )

    def clean_allowed_pools(self):
        names = [n.strip() for n in self.cleaned_data["allowed_pools"].split(",") if n.strip()]
        bad = [n for n in names if not POOL_NAME_RE.match(n)]
        if bad:
            raise forms.ValidationError(f"not a pool name: {', '.join(bad[:5])}")
        if len(names) > 100:
            raise forms.ValidationError("at most 100 pools")
        return list(dict.fromkeys(names))


class PriorityForm(forms.Form):
    priority = forms.IntegerField(label="Priority", min_value=PRIORITY_MIN, max_value=PRIORITY_MAX)


class PreemptForm(forms.Form):
    reason = forms.CharField(label="Reason", required=False, max_length=300)


@staff_page
def console_orgs(request):
    orgs = list(organization_list())
    used = {row["organization"]: row["gpu_hours"] for row in usage_by_organization(timezone.now().date())}
    for org in orgs:
        org.month_gpu_hours = used.get(org.slug, 0.0)
    return render(request, "portal/console/orgs.html", {"orgs": orgs, "section": "orgs"})


@staff_page
@require_http_methods(["GET", "POST"])
def console_quota(request, slug: str):
    org = organization_get(slug)
    quota = org.quota
    if request.method == "GET":
        initial = {f: getattr(quota, f) for f in QuotaForm.base_fields}
        initial["allowed_pools"] = ", ".join(quota.allowed_pools)
        form = QuotaForm(initial=initial)
        return render(request, "portal/console/quota.html", {"org": org, "form": form, "section": "orgs"})
    form = QuotaForm(request.POST)
    if form.is_valid():
        try:
            quota_set(organization=org, by=request.user, **form.cleaned_data)
        except DomainError as e:
            add_domain_error(form, e)
        else:
            # A raised quota may let waiting jobs start: nudge the scheduler now rather than at its next beat.
            enqueue("workers.schedule", expires=30)
            messages.success(request, f"Quota of {org.slug} saved.")
            return redirect("console_orgs")
    context = {"org": org, "form": form, "section": "orgs"}
    return render(request, "portal/console/quota.html", context, status=400)


@staff_page
def console_pools(request):
    pools = list(pool_list())
    by_pool: dict[int, list] = {}
    for a in allocation_list_live():
        by_pool.setdefault(a.pool_id, []).append(a)
    rows = [{"pool": p, "allocations": by_pool.get(p.pk, [])} for p in pools]
    return render(request, "portal/console/pools.html", {"rows": rows, "section": "pools"})


@staff_page
@require_POST
def console_pool_enabled(request, pool: str):
    row = pool_get(pool)
    enabled = request.POST.get("enabled") == "1"
    pool_update(pool=row, enabled=enabled)
    what = "enabled" if enabled else "disabled: it admits no new jobs; running ones go on"
    messages.success(request, f"Pool {row.name} {what}.")
    return redirect("console_pools")


@staff_page
def console_queue(request):
    count, queued = queue_explain(limit=QUEUE_LIMIT)
    for row in queued:
        row["form"] = PriorityForm(initial={"priority": row["priority"]}, auto_id=f"id_prio_{row['id']}_%s")
    running = job_list_running()
    context = {
        "count": count,
        "queued": queued,
        "limit": QUEUE_LIMIT,
        "running": running,
        "section": "queue",
    }
    return render(request, "portal/console/queue.html", context)


@staff_page
@require_POST
def console_job_priority(request, job_id: str):
    job = job_get_any(job_id)
    form = PriorityForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Priority of {job.name}: {form.errors['priority'][0]}")
        return redirect("console_queue")
    job_set_priority(job=job, priority=form.cleaned_data["priority"], actor=Actor.for_request(request.user))
    messages.success(request, f"Priority of {job.name} set to {form.cleaned_data['priority']}.")
    return redirect("console_queue")


@staff_page
@require_POST
def console_job_preempt(request, job_id: str):
    job = job_get_any(job_id)
    form = PreemptForm(request.POST)
    reason = form.cleaned_data["reason"] if form.is_valid() else ""
    job = job_preempt(job=job, actor=Actor.for_request(request.user), reason=reason)
    messages.success(request, f"{job.name} of {job.organization.slug}: preemption requested ({job.state}).")
    return redirect("console_queue")


@staff_page
def console_usage(request):
    form, month = parse_month(request)
    rows = usage_by_organization(month)
    for row in rows:
        quota = row["gpu_hours_quota"]
        row["percent"] = round(100 * row["gpu_hours"] / quota, 1) if quota else None
    context = {"form": form, "month": month, "rows": rows, "section": "usage"}
    return render(request, "portal/console/usage.html", context)
