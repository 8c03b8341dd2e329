"""The dashboard: the organization's running and queued jobs, recent results, this month's usage."""

from __future__ import annotations

from django.shortcuts import render

from opentinker.spec import TERMINAL_STATES, JobState
from portal.models import Quota
from portal.selectors.jobs import job_list, last_metric_values
from portal.selectors.usage import organization_usage
from portal.web.tenancy import org_page

ACTIVE = [JobState.RUNNING, JobState.CANCELLING, JobState.ADMITTED]
RECENT = 10


@org_page
def dashboard(request):
    org = request.organization
    (month, *_) = organization_usage(org, months=1)
    recent = list(job_list(org, state=[s.value for s in TERMINAL_STATES]).order_by("-finished_at")[:RECENT])
    rewards = last_metric_values(recent, "reward/mean")
    for job in recent:
        job.final_reward = rewards.get(job.pk)
    quota = Quota.objects.filter(organization=org).first()
    used_pct = 0.0
    if month.gpu_hours_quota:
        used_pct = min(100.0, 100 * month.gpu_hours / month.gpu_hours_quota)
    return render(
        request,
        "portal/dashboard/index.html",
        {
            "running": job_list(org, state=[s.value for s in ACTIVE])[:50],
            "queued": job_list(org, state=[JobState.QUEUED.value]).order_by("-priority", "created_at")[:50],
            "recent": recent,
            "month": month,
            "quota": quota,
            "used_pct": used_pct,
        },
    )
