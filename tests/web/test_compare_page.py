"""Compare runs (/jobs/compare/): several jobs' curves overlaid by step or wall time, smoothed, and the keys
of their specs that differ.

Actors: alice (owner of acme) and bob (teammate) compare acme's jobs; charlie (outsider, owner of globex) gets
404 for any of acme's job ids, alone or mixed with his own, and never sees acme's jobs offered.
"""

from __future__ import annotations

import html as html_lib
import json
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from portal.models import Metric
from portal.selectors.compare import MAX_JOBS
from tests.web.conftest import SCREENSHOTS
from tests.web.pages import signed_in, unlabelled_fields
from tests.web.test_jobs_pages import submit

pytestmark = pytest.mark.django_db

T0 = timezone.now().replace(microsecond=0) - timedelta(days=2)


def record(job, points: dict[str, list[float]], seconds_per_step: float) -> None:
    """Points at steps 0..n-1, received `seconds_per_step` apart (a slower run spreads out in wall time)."""
    Metric.objects.bulk_create(
        Metric(job=job, name=name, step=step, value=v)
        for name, vs in points.items()
        for step, v in enumerate(vs)
    )
    steps = max(len(vs) for vs in points.values())
    for step in range(steps):
        Metric.objects.filter(job=job, step=step).update(
            created_at=T0 + timedelta(seconds=step * seconds_per_step)
        )


def two_runs(org):
    fast = submit(org, "lr-high", seed=1)
    slow = submit(org, "lr-low", seed=1)
    fast.spec["algorithm"]["learning_rate"] = 0.0003
    fast.save(update_fields=["spec"])
    record(fast, {"reward/mean": [0.0, 1.0, 0.0, 1.0], "loss": [2.0, 1.5, 1.0, 0.5]}, seconds_per_step=10)
    record(slow, {"reward/mean": [0.0, 0.5, 0.5], "kl": [0.1, 0.2, 0.3]}, seconds_per_step=30)
    return fast, slow


def results_data(html: str) -> dict:
    m = re.search(r'<script id="compare-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(html_lib.unescape(m.group(1)))


def diff_rows(html: str) -> dict[str, list[str]]:
    rows = re.findall(r'<tr data-key="([^"]+)">(.*?)</tr>', html, re.S)
    return {
        k: [html_lib.unescape(v) for v in re.findall(r"<td><code>(.*?)</code></td>", body)]
        for k, body in rows
    }


def test_two_runs_overlaid_with_their_config_differences(alice, bob, acme):
    fast, slow = two_runs(acme)
    url = f"/jobs/compare/?job={fast.pk}&job={slow.pk}"
    page = signed_in(bob).get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert unlabelled_fields(html) == []
    # Only the keys that differ, one column per job; equal keys (algorithm.name, seed) are left out.
    assert diff_rows(html) == {"algorithm.learning_rate": ["0.0003", "0.0001"], "name": ["lr-high", "lr-low"]}
    assert "2 keys differ; keys equal in every spec are left out." in html
    data = results_data(html)
    assert data["metrics"] == ["reward/mean", "loss", "kl"]  # the defaults that either job recorded
    assert [j["name"] for j in data["jobs"]] == ["lr-high", "lr-low"]
    fast_reward = data["curves"][str(fast.pk)]["reward/mean"]
    assert fast_reward == {
        "steps": [0, 1, 2, 3],
        "seconds": [0.0, 10.0, 20.0, 30.0],
        "values": [0.0, 1.0, 0.0, 1.0],
    }
    assert data["curves"][str(slow.pk)]["reward/mean"]["seconds"] == [0.0, 30.0, 60.0]
    assert "loss" not in data["curves"][str(slow.pk)]
    last = re.findall(r'<tr data-metric="([^"]+)" data-job="([^"]+)">.*?<td class="num">([^<]*)</td>\s*'
                      r'<td class="num">([^<]*)</td>', html, re.S)  # fmt: skip
    assert [(m, j == str(fast.pk), s, v) for m, j, s, v in last] == [
        ("reward/mean", True, "3", "1"), ("reward/mean", False, "2", "0.5"),
        ("loss", True, "3", "0.5"), ("loss", False, "—", "—"),
        ("kl", True, "—", "—"), ("kl", False, "2", "0.3"),
    ]  # fmt: skip
    # Every job of the organization is offered, the compared ones checked.
    assert f'name="job" value="{fast.pk}" checked' in html and f'name="job" value="{slow.pk}" checked' in html

    # The controls: one metric, aligned by wall time, smoothed; htmx gets the results alone.
    c = signed_in(alice)
    part = c.get(url + "&metric=kl&align=time&smooth=0.5", HTTP_HX_REQUEST="true").content.decode()
    assert part.lstrip().startswith('<div id="compare-results">') and "<html" not in part
    assert results_data(part)["metrics"] == ["kl"]
    assert 'data-align="time" data-smooth="0.5"' in part
    junk = c.get(url + "&metric=nope&align=sideways&smooth=7").content.decode()
    assert 'data-align="step" data-smooth="0.0"' in junk and results_data(junk)["metrics"] == [
        "reward/mean",
        "loss",
        "kl",
    ]


def test_the_same_specs_and_a_single_job(alice, acme):
    a, b = submit(acme, "same"), submit(acme, "same")
    c = signed_in(alice)
    assert "The specs are the same." in c.get(f"/jobs/compare/?job={a.pk}&job={b.pk}").content.decode()
    one = c.get(f"/jobs/compare/?job={a.pk}&job={a.pk}").content.decode()  # a repeated id counts once
    assert (
        "Pick another job to see how the configs differ." in one
        and "These jobs have recorded no metrics" in one
    )
    empty = c.get("/jobs/compare/").content.decode()
    assert "Pick two or more jobs above" in empty and f'value="{a.pk}">' in empty


def test_too_many_jobs_is_a_clear_error(alice, acme):
    jobs = [submit(acme, f"j{i}") for i in range(MAX_JOBS + 1)]
    r = signed_in(alice).get("/jobs/compare/?" + "&".join(f"job={j.pk}" for j in jobs))
    assert r.status_code == 400
    assert f"compare at most {MAX_JOBS} jobs at a time ({MAX_JOBS + 1} picked)" in r.content.decode()


def test_an_outsider_gets_404_and_never_sees_the_jobs(alice, acme, charlie, globex):
    fast, slow = two_runs(acme)
    own = submit(globex, "charlies-run")
    c = signed_in(charlie)
    assert c.get(f"/jobs/compare/?job={fast.pk}").status_code == 404
    assert c.get(f"/jobs/compare/?job={own.pk}&job={slow.pk}").status_code == 404
    assert c.get(f"/jobs/compare/?job={own.pk}&job={slow.pk}", HTTP_HX_REQUEST="true").status_code == 404
    assert c.get("/jobs/compare/?job=not-a-uuid").status_code == 404
    page = c.get(f"/jobs/compare/?job={own.pk}").content.decode()
    assert "charlies-run" in page and "lr-high" not in page and str(fast.pk) not in page


def test_each_job_colour_stands_out_against_the_chart():
    from portal.web.compare import COLORS
    from tests.web.test_contrast import ratio

    # WCAG 1.4.11: lines and the table's swatches need 3:1 against the white chart.
    assert len(set(COLORS)) == MAX_JOBS
    assert min(ratio(c, "#ffffff") for c in COLORS) >= 3


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_overlays_runs_switches_alignment_and_smooths(page, live_url, sign_in, alice, acme):
    from playwright.sync_api import expect

    fast, slow = two_runs(acme)
    third = submit(acme, "lr-high-seed2", seed=2)
    record(third, {"reward/mean": [0.25, 0.75]}, seconds_per_step=5)
    sign_in(alice)
    page.goto("/jobs/")
    page.get_by_role("link", name="Compare runs").click()
    expect(page.get_by_role("heading", name="Compare runs")).to_be_visible()
    settled = page.locator(".htmx-added, .htmx-settling, .htmx-swapping, .htmx-request")
    # Picking jobs swaps the results in (htmx) and pushes the URL, so the view can be linked.
    page.get_by_role("checkbox", name=re.compile(r"lr-high rl,")).check()
    expect(page.locator("#compare-charts")).to_have_count(1)
    expect(settled).to_have_count(0)
    page.get_by_role("checkbox", name=re.compile(r"lr-low rl,")).check()
    reward = page.locator('.chart[data-metric="reward/mean"]')
    # The jobs in the list's order (newest first): lr-low, then lr-high.
    expect(reward).to_have_attribute("data-last", "[0.5,1]")
    expect(reward).to_have_attribute("aria-label", "reward/mean by step: lr-low last 0.5; lr-high last 1")
    expect(page.locator("#compare-diff tbody tr")).to_have_count(2)
    assert f"job={fast.pk}" in page.url and f"job={slow.pk}" in page.url
    expect(settled).to_have_count(0)
    page.get_by_role("checkbox", name=re.compile(r"lr-high-seed2 rl,")).check()
    expect(page.locator("#compare-diff thead th")).to_have_count(4)  # key + three jobs
    expect(page.locator('#compare-diff tr[data-key="seed"] td')).to_have_text(["2", "1", "1"])
    expect(settled).to_have_count(0)

    page.select_option("#compare-align", "time")
    expect(reward).to_have_attribute("data-x-max", "60")  # lr-low's third point, 60 s after its first
    expect(reward).to_have_attribute("aria-label", re.compile(r"^reward/mean by wall time: "))
    expect(settled).to_have_count(0)
    # Smoothing (TensorBoard's debiased EMA) at 0.5: lr-high's 0,1,0,1 ends at 0.625 / (1 - 0.5**4).
    page.locator("#compare-smooth").fill("0.5")
    expect(page.locator("#compare-smooth-value")).to_have_text("0.5")
    expect(reward).to_have_attribute("data-last", "[0.583333,0.428571,0.666667]")
    expect(settled).to_have_count(0)
    assert "smooth=0.5" in page.url and "align=time" in page.url
    # The metrics picked with the first job stay picked (loss, reward/mean); kl joins when asked for.
    expect(page.locator("#compare-charts canvas")).to_have_count(2)
    page.get_by_role("checkbox", name="kl", exact=True).check()
    kl = page.locator('.chart[data-metric="kl"]')
    expect(kl).to_have_attribute("aria-label", re.compile(r"^kl by wall time, smoothed 0.5: "))
    expect(page.locator("#compare-charts canvas")).to_have_count(3)
    expect(settled).to_have_count(0)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("main").screenshot(path=str(SCREENSHOTS / "compare.png"))  # docs/screenshots/compare.png
