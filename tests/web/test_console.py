"""The admin console: organizations and quotas, pools, the queue (why each job waits, priority, preempt),
usage per organization and month. Platform staff only: every console URL is a 404 for anyone else.

Actors: a staffer (platform staff, owner of org ops), alice (owner of acme, not staff), bob (member of acme),
charlie (owner of globex).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client

from portal.models import Allocation, ComputePool, Job, JobEvent, Quota
from portal.services.orgs import organization_create
from portal.services.scheduler import schedule_pass
from portal.services.usage import usage_charge
from portal.web import urls as web_urls
from tests.web.conftest import shot
from tests.web.pages import signed_in, unlabelled_fields
from tests.workers.conftest import make_pool, set_quota, submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def staffer(make_user):
    user = make_user("staffer", staff=True)
    organization_create(slug="ops", name="Ops", owner=user)
    return user


@pytest.fixture
def as_staff(staffer):
    return signed_in(staffer)


def quota_form(**changes) -> dict:
    base = {
        "max_gpus": 1,
        "borrowing_limit_gpus": 0,
        "gpu_hours_per_month": 100,
        "max_queued_jobs": 20,
        "max_cpus_per_job": 8,
        "fair_share_weight": 1.0,
        "allowed_pools": "",
    }
    return {**base, **changes}


def quota_values(org) -> dict:
    return Quota.objects.filter(organization=org).values().get()


def console_urls(job_id, slug) -> list[tuple[str, str]]:
    """Every console route of the URL conf (so a new one cannot be forgotten), as (method, url)."""
    routes = [p for p in web_urls.urlpatterns if str(p.pattern).startswith("console/")]
    args = {"job_id": str(job_id), "slug": slug, "pool": "gpu-a"}
    urls = []
    for p in routes:
        url = "/" + re.sub(r"<\w+:(\w+)>", lambda m: args[m.group(1)], str(p.pattern))
        urls += [("get", url), ("post", url)]
    return urls


def test_non_staff_get_404_on_every_console_url(alice, bob, acme, charlie, globex, staffer):
    make_pool("gpu-a", 4)
    job = submit(acme, gpus=1, name="job")
    before = quota_values(acme)
    urls = console_urls(job.pk, "acme")
    assert len(urls) == 2 * 11
    # With CSRF enforced, as in a browser: even a POST without a token is a 404, not a CSRF 403.
    visitors = [signed_in(u, o, csrf=True) for u, o in ((alice, acme), (bob, acme), (charlie, globex))]
    for who in (Client(enforce_csrf_checks=True), *visitors):
        for method, url in urls:
            data = {**quota_form(max_gpus=64), "priority": 5, "reason": "x", "enabled": "0"}
            resp = getattr(who, method)(url, data)
            assert resp.status_code == 404, (method, url)
    job.refresh_from_db()
    assert quota_values(acme) == before and job.priority == 0 and job.state == "queued"
    assert ComputePool.objects.get(name="gpu-a").enabled
    # Staff the moment they stop being staff (or active) lose the console with their next request.
    client = signed_in(staffer)
    assert client.get("/console/").status_code == 200
    staffer.is_staff = False
    staffer.save()
    assert client.get("/console/").status_code == 404


def test_organizations_and_quota_edit(as_staff, acme, globex):
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    usage_charge(
        organization_id=acme.pk, start=month, end=month + timedelta(hours=1.5), gpus=2, cpus=1, slots=2
    )
    html = as_staff.get("/console/").content.decode()
    assert 'data-org="acme"' in html and 'data-org="globex"' in html and 'data-org="ops"' in html
    acme_row = re.search(r'<tr data-org="acme">(.*?)</tr>', html, re.S).group(1)
    # members, nominal GPUs, borrowing, GPU-hours this month, GPU-hours per month, queued, CPUs, weight
    assert re.findall(r'<td class="num">([^<]*)</td>', acme_row) == [
        "2",
        "1",
        "0",
        "3.00",
        "100",
        "20",
        "8",
        "1.0",
    ]
    page = as_staff.get("/console/orgs/acme/quota/")
    assert page.status_code == 200 and unlabelled_fields(page.content.decode()) == []
    assert 'name="max_gpus" value="1"' in page.content.decode()
    resp = as_staff.post(
        "/console/orgs/acme/quota/",
        quota_form(max_gpus=8, borrowing_limit_gpus=4, gpu_hours_per_month=500, allowed_pools="gpu-a, gpu-b"),
    )
    assert resp.status_code == 302 and resp["Location"] == "/console/"
    q = Quota.objects.get(organization=acme)
    assert (q.max_gpus, q.borrowing_limit_gpus, q.gpu_hours_per_month, q.allowed_pools) == (
        8,
        4,
        500,
        ["gpu-a", "gpu-b"],
    )
    assert "Quota of acme saved." in as_staff.get("/console/").content.decode()
    assert as_staff.get("/console/orgs/nobody/quota/").status_code == 404


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"max_gpus": -1}, "max_gpus", "greater than or equal to 0"),
        ({"max_gpus": "lots"}, "max_gpus", "Enter a whole number."),
        ({"max_gpus": 5000}, "max_gpus", "less than or equal to 4096"),
        ({"fair_share_weight": 0}, "fair_share_weight", "greater than or equal to 0.01"),
        ({"max_cpus_per_job": 0}, "max_cpus_per_job", "greater than or equal to 1"),
        ({"gpu_hours_per_month": ""}, "gpu_hours_per_month", "This field is required."),
        ({"allowed_pools": "gpu-a, Bad Pool"}, "allowed_pools", "not a pool name: Bad Pool"),
    ],
)
def test_bad_quota_values_show_a_field_error_and_change_nothing(as_staff, acme, changes, field, message):
    before = quota_values(acme)
    resp = as_staff.post("/console/orgs/acme/quota/", quota_form(**{"max_gpus": 9, **changes}))
    assert resp.status_code == 400
    html = resp.content.decode()
    error = re.search(rf'<p class="field-error" role="alert" data-field="{field}">([^<]*)</p>', html)
    assert error is not None and message in error.group(1)
    assert 'aria-invalid="true"' in html
    assert quota_values(acme) == before


def test_queue_says_why_jobs_wait_and_staff_reprioritize_and_preempt(as_staff, acme, globex):
    make_pool("gpu-a", 4)
    set_quota(acme, max_gpus=2)
    set_quota(globex, max_gpus=8)
    running = submit(acme, gpus=2, name="running")
    schedule_pass()
    waiting = submit(acme, gpus=1, name="over-quota")
    too_big = submit(globex, gpus=8, name="too-big")
    page = as_staff.get("/console/queue/")
    html = page.content.decode()
    assert unlabelled_fields(html) == []
    rows = dict(re.findall(r'<tr data-job="([^"]+)">.*?data-testid="reason">([^<]*)<', html, re.S))
    assert rows["over-quota"].startswith("quota: the organization holds 2 of its 2 concurrent GPUs")
    assert rows["too-big"] == "capacity: needs 8 GPUs; the largest pool it may use has 4"
    assert "Preempt" in html and 'data-job="running"' in html

    resp = as_staff.post(f"/console/jobs/{waiting.pk}/priority/", {"priority": 7})
    assert resp.status_code == 302
    waiting.refresh_from_db()
    assert (waiting.priority, waiting.spec["priority"]) == (7, 7)
    event = JobEvent.objects.filter(job=waiting).order_by("-seq").first()
    assert event.message == "priority changed from 0 to 7 by staffer" and event.actor_label == "staffer"
    resp = as_staff.post(f"/console/jobs/{too_big.pk}/priority/", {"priority": 11}, follow=True)
    assert "Priority of too-big: Ensure this value is less than or equal to 10." in resp.content.decode()
    assert Job.objects.get(pk=too_big.pk).priority == 0

    # Admitted, not launched: preempting re-queues it at once.
    resp = as_staff.post(f"/console/jobs/{running.pk}/preempt/", {"reason": "maintenance"}, follow=True)
    assert resp.status_code == 200 and "running of acme: preemption requested (queued)." in (
        resp.content.decode()
    )
    running.refresh_from_db()
    assert running.state == "queued" and Allocation.objects.get(job=running).released_at is not None
    # A queued job cannot be preempted: the refusal is shown, nothing changes.
    resp = as_staff.post(f"/console/jobs/{waiting.pk}/preempt/", {}, follow=True)
    assert "only an admitted or running job can be preempted" in resp.content.decode()
    assert as_staff.post("/console/jobs/not-a-uuid/preempt/").status_code == 404


def test_pools_with_health_and_what_runs_on_them(as_staff, acme):
    make_pool("gpu-a", 4)
    make_pool("ray-b", 0, driver="ray", ray_address="http://10.0.0.5:8265", health_message="no head node")
    set_quota(acme, max_gpus=4)
    job = submit(acme, gpus=3, name="trainer")
    schedule_pass()
    Allocation.objects.filter(job=job).update(runtime_host="node-7", launched_at=datetime.now(UTC))
    ComputePool.objects.filter(name="ray-b").update(health="down")
    html = as_staff.get("/console/pools/").content.decode()
    gpu_a = re.search(r'data-pool="gpu-a"(.*?)</section>', html, re.S).group(1)
    assert "<strong>3 / 4</strong> in use" in gpu_a and "node-7" in gpu_a and "trainer" in gpu_a
    assert '<span class="health health-healthy">Healthy</span>' in gpu_a
    ray_b = re.search(r'data-pool="ray-b"(.*?)</section>', html, re.S).group(1)
    assert '<span class="health health-down">Down</span>' in ray_b and "no head node" in ray_b
    # Disabling a pool stops new admissions there; what runs goes on.
    resp = as_staff.post("/console/pools/gpu-a/enabled/", {"enabled": "0"}, follow=True)
    assert "Pool gpu-a disabled: it admits no new jobs; running ones go on." in resp.content.decode()
    assert not ComputePool.objects.get(name="gpu-a").enabled
    later = submit(acme, gpus=1, name="later")
    assert schedule_pass().admitted == [] and Job.objects.get(pk=job.pk).state == "admitted"
    as_staff.post("/console/pools/gpu-a/enabled/", {"enabled": "1"})
    assert schedule_pass().admitted == [later.pk]
    assert as_staff.post("/console/pools/nowhere/enabled/", {"enabled": "1"}).status_code == 404


def test_usage_report_per_organization_and_month(as_staff, acme, globex):
    start = datetime(2025, 6, 3, tzinfo=UTC)
    usage_charge(
        organization_id=acme.pk, start=start, end=start + timedelta(hours=5), gpus=2, cpus=4, slots=2
    )
    usage_charge(
        organization_id=globex.pk, start=start, end=start + timedelta(hours=1), gpus=1, cpus=1, slots=1
    )
    html = as_staff.get("/console/usage/?month=2025-06").content.decode()
    assert unlabelled_fields(html) == []
    assert re.findall(r'<tr data-org="([^"]+)">', html) == ["acme", "globex"]  # biggest first
    acme_row = re.search(r'<tr data-org="acme">(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r'<td class="num">([^<]*)</td>', acme_row) == ["10.00", "20.00", "100", "10.0%"]
    assert "No usage recorded" in as_staff.get("/console/usage/?month=2025-05").content.decode()
    assert 'data-field="month"' in as_staff.get("/console/usage/?month=2025-13").content.decode()


def test_csrf_is_enforced_on_every_console_form(staffer, acme):
    make_pool("gpu-a", 4)
    job = submit(acme, gpus=1, name="job")
    client = signed_in(staffer, csrf=True)
    before = quota_values(acme)
    assert client.post("/console/orgs/acme/quota/", quota_form(max_gpus=64)).status_code == 403
    assert client.post(f"/console/jobs/{job.pk}/priority/", {"priority": 3}).status_code == 403
    assert client.post(f"/console/jobs/{job.pk}/preempt/", {}).status_code == 403
    job.refresh_from_db()
    assert quota_values(acme) == before and job.priority == 0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_admin_raises_a_quota_and_the_waiting_job_starts(page, live_url, sign_in, staffer, acme):
    from playwright.sync_api import expect

    make_pool("gpu-a", 4)
    set_quota(acme, max_gpus=1)
    submit(acme, gpus=1, name="first")
    assert len(schedule_pass().admitted) == 1
    waiting = submit(acme, gpus=1, name="waiting")
    assert schedule_pass().admitted == []  # acme holds its one GPU: the job waits for quota

    sign_in(staffer)
    page.goto("/console/queue/")
    reason = page.locator('tr[data-job="waiting"]').get_by_test_id("reason")
    expect(reason).to_have_text(re.compile(r"^quota: the organization holds 1 of its 1 concurrent GPUs"))
    shot(page, "console-queue")
    page.get_by_role("link", name="Organizations & quotas").click()
    shot(page, "console-quotas")
    page.get_by_role("link", name="Edit quota of acme").click()
    page.get_by_label("Nominal GPUs").fill("-3")
    page.get_by_role("button", name="Save quota").click()
    expect(page.locator('[data-field="max_gpus"]')).to_contain_text("greater than or equal to 0")
    assert Quota.objects.get(organization=acme).max_gpus == 1
    page.get_by_label("Nominal GPUs").fill("2")
    page.get_by_role("button", name="Save quota").click()
    expect(page.get_by_role("status")).to_contain_text("Quota of acme saved.")
    expect(page.locator('tr[data-org="acme"] td.num').nth(1)).to_have_text("2")

    # The real scheduler's next pass (the console nudged it; beat runs it every few seconds) admits it.
    assert schedule_pass().admitted == [waiting.pk]
    page.goto("/console/queue/")
    expect(page.get_by_text("Nothing is waiting.")).to_be_visible()
    expect(page.locator('tr[data-job="waiting"]')).to_contain_text("admitted")
    page.get_by_role("link", name="Pools").click()
    expect(page.locator('[data-pool="gpu-a"]')).to_contain_text("2 / 4")
    shot(page, "console-pools")
