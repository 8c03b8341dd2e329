"""The dashboard: the organization's running and queued jobs, recent results with their final reward, and
this month's usage against the quota. Actors: alice (owner of acme), bob (member of acme), charlie (outsider:
sees none of acme's jobs on his own dashboard)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from opentinker.spec import JobState
from portal.actors import Actor
from portal.models import Metric, UsageRecord
from portal.services.jobs import job_transition
from portal.services.usage import month_start
from tests.web.pages import signed_in
from tests.web.test_jobs_pages import submit

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")


def section(html: str, heading_id: str) -> list[str]:
    """The job names listed in one section of the dashboard."""
    part = html.split(f'id="{heading_id}"', 1)[1].split("</section>", 1)[0]
    return re.findall(r'<a href="/jobs/[0-9a-f-]{36}/">([^<]+)</a>', part)


def test_running_queued_and_recent_with_final_rewards(alice, bob, acme, charlie, globex):
    running = submit(acme, "running-one")
    for state in (JobState.ADMITTED, JobState.RUNNING):
        running = job_transition(job=running, to=state, actor=SYSTEM)
    submit(acme, "queued-low")
    submit(acme, "queued-high", priority=5)
    done = submit(acme, "done-one")
    for state in (JobState.ADMITTED, JobState.RUNNING, JobState.SUCCEEDED):
        done = job_transition(job=done, to=state, actor=SYSTEM)
    Metric.objects.bulk_create(
        [Metric(job=done, name="reward/mean", step=s, value=v) for s, v in [(1, 0.1), (2, 0.5), (3, 0.875)]]
    )
    submit(globex, "globex-job")

    html = signed_in(bob).get("/").content.decode()
    assert section(html, "running-h") == ["running-one"]
    assert section(html, "queued-h") == ["queued-high", "queued-low"]  # in the order they would start
    assert section(html, "recent-h") == ["done-one"]
    assert re.search(r'class="final-reward">0\.875 <span class="muted">at step 3</span>', html)
    assert "globex-job" not in html
    assert section(signed_in(charlie).get("/").content.decode(), "queued-h") == ["globex-job"]


def test_usage_against_the_monthly_quota(alice, acme):
    now = timezone.now()
    UsageRecord.objects.create(
        organization=acme, month=month_start(now), gpu_seconds=25 * 3600, cpu_seconds=5400
    )
    last_month = month_start(now.replace(day=1) - timedelta(days=1))
    UsageRecord.objects.create(organization=acme, month=last_month, gpu_seconds=99 * 3600)  # not this month
    html = signed_in(alice).get("/").content.decode()
    assert '<dd id="gpu-hours">25.00 of 100</dd>' in html
    assert '<dd id="cpu-hours">1.50</dd>' in html
    assert 'aria-valuenow="25"' in html and 'style="width: 25%"' in html
