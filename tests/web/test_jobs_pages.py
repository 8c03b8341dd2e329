"""Job pages: list with filters, the new-job form (inline errors field by field, nothing stored on error),
the job page (status, queue position and why it waits, config, events, logs, checkpoints), cancel and resume.

Actors: alice (owner of acme), bob (teammate in acme; a viewer where a test says so), charlie (outsider,
owner of globex: 404 on every acme job URL). The browser journey is at the end: submit the example job from
the form; a real Celery worker schedules it and runs the real runtime on the local pool; watch its reward
curve grow live; download a checkpoint.
"""

from __future__ import annotations

import html as html_lib
import os
import re
import signal
import subprocess

import pytest

from opentinker.spec import JobState, example_rl_spec
from portal import storage
from portal.actors import Actor
from portal.celery import app
from portal.models import Checkpoint, ComputePool, Job, JobLog, Membership, Role
from portal.services import ingest
from portal.services.jobs import job_cancel, job_submit, job_transition
from tests.web.conftest import shot
from tests.web.pages import signed_in, unlabelled_fields
from tests.workers.conftest import make_pool, set_quota
from tests.workers.test_celery_worker import start_worker
from tests.workers.test_local_driver import wait_for

pytestmark = pytest.mark.django_db

# The form's fields for the example job (what the page pre-fills), as a browser posts them.
EXAMPLE_FORM = {
    "kind": "rl",
    "name": "arithmetic-grpo",
    "model_base": "tiny-qwen2",
    "environment_ref": "opentinker/arithmetic@1.0.0",
    "dataset_uri": "",
    "algorithm_name": "grpo",
    "algorithm_steps": "20",
    "algorithm_batch_size": "4",
    "algorithm_group_size": "4",
    "algorithm_learning_rate": "0.0001",
    "algorithm_max_new_tokens": "8",
    "algorithm_kl_coef": "0.0",
    "resources_gpus": "0",
    "resources_cpus": "2",
    "resources_memory_gb": "4.0",
    "resources_max_hours": "0.5",
    "resources_pool": "",
    "checkpoint_every_steps": "5",
    "checkpoint_keep_last": "2",
    "seed": "1",
    "priority": "0",
}


def submit(org, name="job", **changes) -> Job:
    spec = example_rl_spec().model_copy(update={"name": name, **changes})
    job, _ = job_submit(organization=org, actor=Actor.system("test"), spec=spec)
    return job


def field_errors(html: str) -> dict[str, str]:
    """The inline error shown next to each field of a form page, unescaped."""
    found = re.findall(r'<p class="field-error" role="alert" data-field="([^"]+)">([^<]*)</p>', html)
    return {k: html_lib.unescape(v) for k, v in found}


@pytest.fixture
def viewer_bob(bob, acme):
    Membership.objects.filter(user=bob, organization=acme).update(role=Role.VIEWER)
    return bob


# -- the form --


def test_the_form_prefills_the_example_job_and_submitting_it_stores_exactly_that_spec(alice, acme):
    c = signed_in(alice)
    page = c.get("/jobs/new/")
    assert page.status_code == 200
    html = page.content.decode()
    for name, value in EXAMPLE_FORM.items():
        if value:
            assert re.search(rf'name="{name}"[^>]*value="{re.escape(value)}"', html) or (
                f'<option value="{value}" selected>' in html
            ), name
    key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', html)[1]
    r = c.post("/jobs/new/", {**EXAMPLE_FORM, "idempotency_key": key})
    job = Job.objects.get(organization=acme)
    assert r.status_code == 302 and r["Location"] == f"/jobs/{job.pk}/"
    assert job.spec == example_rl_spec().model_dump(mode="json")
    assert job.state == "queued" and job.created_by == alice
    # The same form posted twice (a double click, a reload) is one job.
    again = c.post("/jobs/new/", {**EXAMPLE_FORM, "idempotency_key": key})
    assert again["Location"] == f"/jobs/{job.pk}/" and Job.objects.count() == 1


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"algorithm_steps": "0"}, "algorithm_steps", "Input should be greater than or equal to 1"),
        ({"model_base": "gpt-17"}, "model_base", "unknown model 'gpt-17'"),
        ({"environment_ref": ""}, "environment_ref", "a rl job needs an environment"),
        ({"environment_ref": "not a ref"}, "environment_ref", "environment must be `owner/name@version`"),
        ({"environment_ref": "opentinker/nope@1.0.0"}, "environment_ref", "no environment opentinker/nope"),
        ({"algorithm_name": "sft"}, "algorithm_name", "'sft' is not valid for a rl job"),
        ({"algorithm_learning_rate": "abc"}, "algorithm_learning_rate", "Enter a number."),
        ({"resources_gpus": "64"}, "resources_gpus", "the job asks for 64 GPUs"),
        ({"priority": "11"}, "priority", "Input should be less than or equal to 10"),
        ({"name": "bad/name"}, "name", "name must be 1-100 letters"),
    ],
)
def test_bad_input_is_shown_next_to_its_field_and_nothing_is_stored(alice, acme, changes, field, message):
    r = signed_in(alice).post("/jobs/new/", {**EXAMPLE_FORM, **changes})
    assert r.status_code == 400
    errors = field_errors(r.content.decode())
    assert list(errors) == [field], errors
    assert message in errors[field]
    assert 'aria-invalid="true"' in r.content.decode()
    assert Job.objects.count() == 0


def test_every_field_of_the_job_pages_has_a_label(alice, acme):
    job = submit(acme)
    c = signed_in(alice)
    for url in ("/jobs/", "/jobs/new/", f"/jobs/{job.pk}/", "/"):
        html = c.get(url).content.decode()
        assert unlabelled_fields(html) == [], url


def test_a_viewer_cannot_submit(viewer_bob, acme):
    c = signed_in(viewer_bob)
    assert 'id="new-job"' not in c.get("/jobs/").content.decode()
    r = c.post("/jobs/new/", EXAMPLE_FORM)
    assert r.status_code == 403
    assert (
        "A viewer of this organization cannot submit jobs (this needs the jobs:write scope)."
        in r.content.decode()
    )
    assert Job.objects.count() == 0


# -- the list --


def test_list_filters_by_state_kind_and_name(alice, acme, charlie, globex):
    a = submit(acme, "alpha-run")
    b = submit(acme, "beta-run")
    job_cancel(job=b, actor=Actor.system("test"))
    submit(globex, "alpha-of-globex")
    c = signed_in(alice)

    def names(query: str) -> list[str]:
        html = c.get(f"/jobs/{query}").content.decode()
        return re.findall(r'<a href="/jobs/[0-9a-f-]{36}/">([^<]+)</a>', html)

    assert names("") == ["beta-run", "alpha-run"]  # newest first, only acme's
    assert names("?state=queued") == ["alpha-run"]
    assert names("?state=cancelled") == ["beta-run"]
    assert names("?name=ALPHA") == ["alpha-run"]
    assert names("?kind=sft") == []
    assert names("?state=bogus") == ["beta-run", "alpha-run"]  # an invalid filter is ignored, not a 500
    assert a.pk  # (used)


# -- one job --


def test_job_page_shows_status_queue_position_and_why_it_waits(alice, acme):
    make_pool("local", 2, cpu_slots=True, cpus=2)
    waiting = submit(acme, "needs-gpu", resources=example_rl_spec().resources.model_copy(update={"gpus": 1}))
    set_quota(acme, max_gpus=0)  # lowered by an admin after submission: the job waits on its quota
    JobLog.objects.create(job=waiting, seq=1, line="hello from the runtime")
    html = signed_in(alice).get(f"/jobs/{waiting.pk}/").content.decode()
    assert re.search(r'id="job-state" class="state state-queued">queued<', html)
    assert re.search(r'id="queue-position">position 1 of 1 waiting<', html)
    reason = re.search(r'id="queue-reason">([^<]+)<', html)[1]
    assert reason.startswith(("quota:", "capacity:", "pool:")), reason
    assert "hello from the runtime" in html
    assert "&quot;name&quot;: &quot;grpo&quot;" in html  # the config
    assert "submitted (system)" in html or "submitted (test)" in html  # the events timeline


def test_outsider_gets_404_on_every_job_url(alice, acme, charlie, globex):
    job = submit(acme)
    c = signed_in(charlie)
    for url in (f"/jobs/{job.pk}/", f"/jobs/{job.pk}/status/"):
        assert c.get(url).status_code == 404, url
    for url in (f"/jobs/{job.pk}/cancel/", f"/jobs/{job.pk}/resume/"):
        assert c.post(url).status_code == 404, url
    assert c.get("/jobs/not-a-uuid/").status_code == 404
    assert Job.objects.get(pk=job.pk).state == "queued"


def test_viewer_cannot_cancel_with_a_clear_refusal(alice, viewer_bob, acme):
    job = submit(acme)
    c = signed_in(viewer_bob)
    page = c.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="cancel-job"' not in page  # no button offered
    r = c.post(f"/jobs/{job.pk}/cancel/", {"reason": "mine now"})
    assert r.status_code == 403
    assert "A viewer of this organization cannot cancel jobs (this needs the jobs:write scope)." in (
        r.content.decode()
    )
    assert Job.objects.get(pk=job.pk).state == "queued"


def test_owner_cancels_and_the_reason_is_recorded(alice, acme):
    job = submit(acme)
    c = signed_in(alice)
    assert 'id="cancel-job"' in c.get(f"/jobs/{job.pk}/").content.decode()
    r = c.post(f"/jobs/{job.pk}/cancel/", {"reason": "wrong seed"}, follow=True)
    job.refresh_from_db()
    assert job.state == "cancelled" and job.state_reason == "wrong seed"
    assert "job is cancelled." in r.content.decode()
    again = c.post(f"/jobs/{job.pk}/cancel/", follow=True)  # already finished: a message, not a 500
    assert "the job already finished (cancelled)" in again.content.decode()


def test_resume_submits_a_new_job_from_the_last_checkpoint(alice, acme):
    job = submit(acme, "long-run")
    for state in (JobState.ADMITTED, JobState.RUNNING):
        job = job_transition(job=job, to=state, actor=Actor.system("test"))
    job_transition(job=job, to=JobState.FAILED, actor=Actor.system("test"), reason="node lost")
    uri = f"{storage.organization_prefix('acme')}/jobs/{job.pk}/checkpoints"
    Checkpoint.objects.create(job=job, step=5, uri=f"{uri}/step-5", files=[{"name": "model.safetensors"}])
    Checkpoint.objects.create(job=job, step=10, uri=f"{uri}/step-10", files=[{"name": "model.safetensors"}])
    c = signed_in(alice)
    assert 'id="resume-job"' in c.get(f"/jobs/{job.pk}/").content.decode()
    r = c.post(f"/jobs/{job.pk}/resume/")
    new = Job.objects.exclude(pk=job.pk).get()
    assert r["Location"] == f"/jobs/{new.pk}/"
    assert new.spec["resume_from"] == f"{uri}/step-10" and new.name == "long-run-resumed"
    assert {k: v for k, v in new.spec.items() if k not in ("resume_from", "name")} == {
        k: v for k, v in job.spec.items() if k not in ("resume_from", "name")
    }


def test_resume_without_a_checkpoint_says_why(alice, acme):
    job = submit(acme)
    job_cancel(job=job, actor=Actor.system("test"))
    r = signed_in(alice).post(f"/jobs/{job.pk}/resume/", follow=True)
    assert "this job saved no checkpoint to resume from" in r.content.decode()
    assert Job.objects.count() == 1


def test_csrf_is_required_on_every_job_form(alice, acme):
    job = submit(acme)
    c = signed_in(alice, csrf=True)
    assert c.post("/jobs/new/", EXAMPLE_FORM).status_code == 403
    assert c.post(f"/jobs/{job.pk}/cancel/").status_code == 403
    assert c.post(f"/jobs/{job.pk}/resume/").status_code == 403
    assert Job.objects.count() == 1 and Job.objects.get().state == "queued"


def test_signed_out_visitors_are_sent_to_sign_in(client, acme):
    job = submit(acme)
    for url in ("/", "/jobs/", "/jobs/new/", f"/jobs/{job.pk}/"):
        r = client.get(url)
        assert r.status_code == 302 and r["Location"].startswith("/accounts/login/?next="), url


# -- in a real browser --


@pytest.fixture
def platform_worker(live_url, tmp_path):
    """A real Celery worker with its beat (scheduler and supervisor every second) that registers the embedded
    local pool (2 CPU slots) and runs jobs with the real `python -m gpu_runtime run`, reporting to the live
    server (the worker of tests/workers/test_celery_worker.py, with the real runtime)."""
    app.control.purge()  # stale nudges of earlier tests name rows that no longer exist
    worker = start_worker(tmp_path, "worker.log", OPENTINKER_RUNTIME_COMMAND="", INGEST_BASE_URL=live_url)
    try:
        wait_for(
            lambda: ComputePool.objects.filter(name="local", total_gpus=2).exists(),
            timeout=60,
            what="local pool",
        )
        yield worker
    except BaseException:
        print((tmp_path / "worker.log").read_text()[-5000:])
        raise
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)


# Records every value the reward chart's point count takes, in every page from its start (an init script):
# the curve must grow point by point in one document, not appear all at once after a reload.
WATCH_POINTS = """
document.addEventListener("DOMContentLoaded", () => {
  window.__pointsSeen = [];
  const chart = document.querySelector('[data-chart="reward"]');
  if (!chart) return;
  new MutationObserver(() => {
    const n = chart.dataset.points;
    if (n && window.__pointsSeen[window.__pointsSeen.length - 1] !== n) window.__pointsSeen.push(n);
  }).observe(chart, {attributes: true, attributeFilter: ["data-points"]});
});
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_browser_submit_the_example_job_watch_the_reward_grow_live_and_download_a_checkpoint(
    page, live_url, sign_in, platform_worker, alice, acme
):
    from playwright.sync_api import expect

    sign_in(alice)
    page.goto("/jobs/new/")
    expect(page.get_by_label("Environment")).to_have_value("opentinker/arithmetic@1.0.0")
    # The example job, made tiny: 3 GRPO steps of 2 prompts x 2 samples, a checkpoint at steps 2 and 3.
    for label, value in [
        ("Steps", "3"),
        ("Batch size", "2"),
        ("Group size", "2"),
        ("Max new tokens", "4"),
        ("Checkpoint every (steps)", "2"),
    ]:
        page.get_by_label(label, exact=True).fill(value)
    shot(page, "job-new")
    page.add_init_script(WATCH_POINTS)
    # By keyboard: from the last field, Tab reaches the submit button and Enter submits.
    page.get_by_label("Priority").focus()
    page.keyboard.press("Tab")
    expect(page.locator("#submit-job")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(rf"{live_url}/jobs/[0-9a-f-]{{36}}/$"))
    job = Job.objects.get(organization=acme)
    assert (
        job.spec["algorithm"]["steps"] == 3
        and job.spec["environment"]["ref"] == "opentinker/arithmetic@1.0.0"
    )
    expect(page.locator("#live-status")).to_have_text("live")
    document = page.evaluate("performance.timeOrigin")  # changes with any reload

    # Nothing more from the test: the submission nudged the worker, whose scheduler admits the job and whose
    # local driver starts the real runtime, which reports through the live server's ingest API.
    reward = page.locator('[data-chart="reward"]')
    page.wait_for_function(
        "Number(document.querySelector('[data-chart=reward]').dataset.points || 0) >= 1", timeout=180_000
    )
    shot(page, "job-running")
    # Drop the live connection and resume from the last frame received (Last-Event-ID): nothing is lost.
    page.evaluate("window.jobStreamReconnect()")
    expect(page.locator("#live-status")).to_have_text("finished (succeeded)", timeout=180_000)
    expect(reward).to_have_attribute("data-points", "3")
    expect(reward).to_have_attribute("aria-label", "Reward (mean): 3 points, last step 3")
    seen = page.evaluate("window.__pointsSeen")
    assert seen[-1] == "3" and seen == sorted(seen) and len(seen) >= 2, seen  # grew while we watched
    assert page.evaluate("performance.timeOrigin") == document  # ...without a reload
    assert page.locator("#job-live").get_attribute("data-reconnects") == "1"
    for chart in ("kl", "entropy", "loss", "length"):
        expect(page.locator(f'[data-chart="{chart}"]')).to_have_attribute("data-points", "3")
    expect(page.locator("#job-state")).to_have_text("succeeded")  # the status header refreshed itself
    expect(page.locator("#cancel-job")).to_have_count(0)  # ...and the actions: nothing left to cancel

    # Download the last checkpoint's first file: the bytes the runtime wrote.
    last = Checkpoint.objects.filter(job=job).order_by("-step").first()
    assert last.step == 3
    link = page.locator("#checkpoints tbody tr").last.locator("a").first
    with page.expect_download() as info:
        link.click()
    name = link.text_content()
    stored = storage.local_path(storage.file_uri(last.uri, name)).read_bytes()
    with open(info.value.path(), "rb") as downloaded:
        assert downloaded.read() == stored and len(stored) > 0
    shot(page, "job")
    page.goto("/jobs/?state=succeeded")
    expect(page.get_by_role("link", name="arithmetic-grpo")).to_be_visible()
    shot(page, "jobs")
    page.goto("/")
    expect(page.get_by_role("link", name="arithmetic-grpo")).to_be_visible()
    shot(page, "dashboard")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_curves_logs_and_events_update_live_and_survive_a_reconnect(
    page, live_url, sign_in, alice, acme
):
    """The live parts of the job page fed through the real ingest services (no runtime): per-role rewards
    join the reward chart, log lines and events append, and after a dropped connection nothing is shown
    twice or lost."""
    from playwright.sync_api import expect

    job = submit(acme, "live-run")
    for state in (JobState.ADMITTED, JobState.RUNNING):
        job = job_transition(job=job, to=state, actor=Actor.system("scheduler"))
    sign_in(alice)
    page.goto(f"/jobs/{job.pk}/")
    expect(page.locator("#live-status")).to_have_text("live")
    page.evaluate("window.__sameDocument = true")
    reward = page.locator('[data-chart="reward"]')

    def step(n: int, mean: float) -> None:
        points = [
            {"name": "reward/mean", "step": n, "value": mean},
            {"name": "reward/red/mean", "step": n, "value": mean + 0.5},
            {"name": "reward/blue/mean", "step": n, "value": mean - 0.5},
            {"name": "kl", "step": n, "value": 0.01 * n},
        ]
        assert ingest.metrics_ingest(job=job, points=points) == (4, 4)
        ingest.logs_ingest(job=job, lines=[{"line": f"step {n} done", "stream": "stdout"}])

    step(1, 0.25)
    expect(reward).to_have_attribute("data-points", "1")
    expect(reward).to_have_attribute("data-names", "reward/blue/mean|reward/mean|reward/red/mean")
    expect(page.locator('[data-chart="kl"]')).to_have_attribute("data-points", "1")
    expect(page.locator("#log-tail")).to_have_text("step 1 done\n")

    page.evaluate("window.jobStreamReconnect()")
    expect(page.locator("#job-live")).to_have_attribute("data-reconnects", "1")
    step(2, 0.75)
    expect(reward).to_have_attribute("aria-label", "Reward (mean): 2 points, last step 2")
    expect(page.locator("#log-tail")).to_have_text("step 1 done\nstep 2 done\n")  # once each
    job_transition(job=job, to=JobState.SUCCEEDED, actor=Actor.system("supervisor"), reason="all done")
    expect(page.locator("#live-status")).to_have_text("finished (succeeded)")
    expect(page.locator("#events li")).to_have_count(4)  # queued, admitted, running, succeeded: once each
    expect(page.locator("#events li").last).to_contain_text("→ succeeded: all done (supervisor)")
    expect(page.locator("#job-state")).to_have_text("succeeded")
    assert page.evaluate("window.__sameDocument") is True
