"""The job page of a multi-agent job: per-role and per-policy curves, illegal-move rates and the evaluation
against the rule-based player each join their chart; a single-agent job's page does not show those charts."""

from __future__ import annotations

import pytest

from opentinker.spec import JobState
from portal.actors import Actor
from portal.services import ingest
from portal.services.jobs import job_transition
from tests.web.test_jobs_pages import submit

pytestmark = pytest.mark.django_db


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_shows_per_role_and_per_policy_curves_of_a_two_policy_job(
    page, live_url, sign_in, alice, acme
):
    from playwright.sync_api import expect

    job = submit(acme, "two-policies")
    for state in (JobState.ADMITTED, JobState.RUNNING):
        job = job_transition(job=job, to=state, actor=Actor.system("scheduler"))
    sign_in(alice)
    page.goto(f"/jobs/{job.pk}/")
    expect(page.locator("#live-status")).to_have_text("live")
    for chart in ("vs-rule", "illegal", "games"):  # nothing multi-agent reported yet: hidden
        expect(page.locator(f'[data-chart="{chart}"]')).to_be_hidden()

    # What a two-policy tic-tac-toe job reports (gpu_runtime.multiagent): the in-job evaluation against the
    # rule player at step 0, then per-role and per-policy training metrics.
    evals = [
        {"name": f"eval/vs_rule/{p}/{k}", "step": 0, "value": v}
        for p in ("alice", "bob")
        for k, v in (("win_or_draw", 0.1), ("illegal_rate", 0.4), ("x/win_or_draw", 0.2))
    ]
    step1 = [
        {"name": "reward/mean", "step": 1, "value": -0.5},
        {"name": "reward/x/mean", "step": 1, "value": -0.2},
        {"name": "reward/o/mean", "step": 1, "value": -0.8},
        {"name": "policy/alice/reward/mean", "step": 1, "value": -0.4},
        {"name": "policy/bob/reward/mean", "step": 1, "value": -0.6},
        {"name": "game/x/illegal_rate", "step": 1, "value": 0.3},
        {"name": "policy/alice/illegal_rate", "step": 1, "value": 0.35},
        {"name": "game/x/win_rate", "step": 1, "value": 0.5},
        {"name": "game/draw_rate", "step": 1, "value": 0.1},
        {"name": "policy/bob/win_rate", "step": 1, "value": 0.2},
        {"name": "loss", "step": 1, "value": 0.1},
        {"name": "policy/alice/loss", "step": 1, "value": 0.05},
        {"name": "policy/bob/loss", "step": 1, "value": 0.15},
        {"name": "policy/bob/entropy", "step": 1, "value": 1.0},
        {"name": "policy/alice/kl", "step": 1, "value": 0.01},
    ]
    assert ingest.metrics_ingest(job=job, points=evals + step1) == (21, 21)
    names = {
        "reward": "policy/alice/reward/mean|policy/bob/reward/mean|reward/mean|reward/o/mean|reward/x/mean",
        "vs-rule": "eval/vs_rule/alice/win_or_draw|eval/vs_rule/bob/win_or_draw",
        "illegal": "eval/vs_rule/alice/illegal_rate|eval/vs_rule/bob/illegal_rate|game/x/illegal_rate"
        "|policy/alice/illegal_rate",
        "games": "game/draw_rate|game/x/win_rate|policy/bob/win_rate",
        "loss": "loss|policy/alice/loss|policy/bob/loss",
        "entropy": "policy/bob/entropy",
        "kl": "policy/alice/kl",
    }
    for chart, series in names.items():
        el = page.locator(f'[data-chart="{chart}"]')
        expect(el).to_have_attribute("data-names", series)
        expect(el).to_be_visible()
    # A seat's own rate (eval/vs_rule/<policy>/x/...) is in the metrics, not drawn: one curve per policy.
    assert "x/win_or_draw" not in (page.locator('[data-chart="vs-rule"]').get_attribute("data-names") or "")
    ingest.metrics_ingest(
        job=job, points=[{"name": "eval/vs_rule/alice/win_or_draw", "step": 5, "value": 0.6}]
    )
    expect(page.locator('[data-chart="vs-rule"]')).to_have_attribute(
        "aria-label", "Win or draw vs the rule-based player: 2 points, last step 5"
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_a_single_agent_job_keeps_the_multi_agent_charts_hidden(page, live_url, sign_in, alice, acme):
    from playwright.sync_api import expect

    job = submit(acme, "one-policy")
    for state in (JobState.ADMITTED, JobState.RUNNING):
        job = job_transition(job=job, to=state, actor=Actor.system("scheduler"))
    sign_in(alice)
    page.goto(f"/jobs/{job.pk}/")
    expect(page.locator("#live-status")).to_have_text("live")
    ingest.metrics_ingest(job=job, points=[{"name": "reward/mean", "step": 1, "value": 0.5}])
    expect(page.locator('[data-chart="reward"]')).to_have_attribute("data-points", "1")
    for chart in ("vs-rule", "illegal", "games"):
        expect(page.locator(f'[data-chart="{chart}"]')).to_be_hidden()
