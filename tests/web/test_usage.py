"""The organization's usage and quota page: GPU/CPU-hours of a month against the quota, per job.

Actors: alice (owner of acme), bob (member of acme), charlie (owner of globex), who sees only globex's usage.
Usage is charged the real way: jobs admitted by the scheduler, their allocations accounted by the service.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from portal.models import Allocation, UsageRecord
from portal.selectors.usage import job_usage_for_month
from portal.services.scheduler import schedule_pass
from portal.services.usage import allocation_account
from tests.web.conftest import shot
from tests.web.pages import signed_in, unlabelled_fields
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = pytest.mark.django_db

JUNE = datetime(2025, 6, 10, 8, 0, tzinfo=UTC)


def run_for(job, start: datetime, hours: float) -> None:
    """The job's allocation launched at `start` and was charged for `hours`."""
    alloc = Allocation.objects.get(job=job, released_at__isnull=True)
    Allocation.objects.filter(pk=alloc.pk).update(launched_at=start)
    allocation_account(alloc.pk, now=start + timedelta(hours=hours))


def cell(html: str, job: str) -> list[str]:
    row = re.search(rf'<tr data-job="{job}">(.*?)</tr>', html, re.S).group(1)
    return re.findall(r'<td class="num">([^<]*)</td>', row)


@pytest.fixture
def charged(acme, globex):
    make_pool("gpu-a", 8)
    set_quota(acme, max_gpus=4, gpu_hours_per_month=50)
    big = submit(acme, gpus=2, name="big")
    small = submit(acme, gpus=1, cpus=3, name="small")
    other = submit(globex, gpus=1, name="theirs")
    assert len(schedule_pass().admitted) == 3
    run_for(big, JUNE, 3.0)  # 6 GPU-hours, 3 CPU-hours (one CPU)
    run_for(small, JUNE, 1.5)  # 1.5 GPU-hours, 4.5 CPU-hours
    run_for(other, JUNE, 10.0)
    # Across the month's end: 1 h in June, 2 h in July.
    late = submit(acme, gpus=1, name="late")
    schedule_pass()
    run_for(late, datetime(2025, 6, 30, 23, 0, tzinfo=UTC), 3.0)
    return {"big": big, "small": small, "late": late}


def test_a_month_per_job_adds_up_to_the_organization(alice, acme, charged):
    html = signed_in(alice, acme).get("/usage/?month=2025-06").content.decode()
    assert unlabelled_fields(html) == []
    assert cell(html, "big") == ["6.0000", "3.0000"]
    assert cell(html, "small") == ["1.5000", "4.5000"]
    assert cell(html, "late") == ["1.0000", "1.0000"]
    assert 'data-job="theirs"' not in html  # globex's job
    assert '<p class="big" data-testid="gpu-hours">8.50' in html
    assert '<p class="big" data-testid="cpu-hours">8.50' in html
    # The rows of a month add up to what the organization was charged.
    record = UsageRecord.objects.get(organization=acme, month="2025-06-01")
    rows = job_usage_for_month(acme, JUNE.date())
    assert [r.name for r in rows] == ["big", "small", "late"]
    assert sum(r.gpu_hours for r in rows) == pytest.approx(record.gpu_seconds / 3600) == 8.5
    july = signed_in(alice, acme).get("/usage/?month=2025-07").content.decode()
    assert cell(july, "late") == ["2.0000", "2.0000"] and 'data-job="big"' not in july


def test_this_month_against_the_quota(alice, bob, acme, globex, charlie, charged):
    html = signed_in(bob, acme).get("/usage/").content.decode()
    # Nothing charged this month yet; the quota and the GPUs held now are shown.
    assert '<p class="big" data-testid="gpu-hours">0.00 <small>of 50</small>' in html
    assert 'aria-label="GPU-hours used this month, percent of quota">0.0%' in html
    assert "4 <small>of 4 nominal + 0 borrowable</small>" in html  # big 2 + small 1 + late 1
    assert '<th scope="row">GPU-hours per month</th><td>50</td>' in html
    assert "2025-06" in html and "2025-07" in html  # months with usage are listed
    theirs = signed_in(charlie, globex).get("/usage/?month=2025-06").content.decode()
    assert cell(theirs, "theirs") == ["10.0000", "10.0000"] and 'data-job="big"' not in theirs


def test_bad_month_is_a_field_error(alice, acme):
    resp = signed_in(alice, acme).get("/usage/?month=June")
    assert resp.status_code == 200
    html = resp.content.decode()
    assert 'data-field="month"' in html and "Use the form 2026-01." in html


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_usage_page(page, live_url, sign_in, alice, acme, charged):
    from playwright.sync_api import expect

    sign_in(alice)
    page.goto("/usage/")
    expect(page.get_by_role("heading", name="Usage and quota of Acme")).to_be_visible()
    page.get_by_label("Month", exact=True).fill("2025-06")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(f"{live_url}/usage/?month=2025-06")
    expect(page.get_by_test_id("gpu-hours")).to_have_text("8.50")
    expect(page.locator('tr[data-job="big"]')).to_contain_text("6.0000")
    shot(page, "usage")
