"""Structured logs: request ids, the organization and job a line is about, JSON lines, Celery tasks, Sentry.

The log records are caught by a handler built as settings.LOGGING builds the console's (the ids filter and,
for JSON, the JSON formatter), on the real request path: alice (owner of acme) calls the API with her token,
a job's runtime reports with its job token.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import shared_task
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from opentinker.spec import JobState, example_rl_spec
from portal.actors import Actor
from portal.observability import context
from portal.observability.errors import sentry_init
from portal.observability.logs import ContextFilter, JsonFormatter
from portal.services.job_tokens import job_token_issue
from portal.services.jobs import job_submit, job_transition
from tests.conftest import client_for
from tests.portal.test_settings_declared import load_settings

pytestmark = pytest.mark.django_db
BASE = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged meanwhile, as LOG_FORMAT=json writes it; the access log switched on."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    root, access = logging.getLogger(), logging.getLogger("opentinker.access")
    root.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        access.setLevel(level)


def records(stream: io.StringIO, logger: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # each line one JSON object
    return [r for r in lines if logger is None or r["logger"] == logger]


def test_an_api_request_logs_its_request_id_and_organization(json_lines, as_alice, acme):
    resp = as_alice.get("/api/v1/jobs", HTTP_X_REQUEST_ID="req-42.abc")
    assert resp.status_code == 200
    assert resp["X-Request-ID"] == "req-42.abc"  # a proxy's id is kept and echoed
    (line,) = records(json_lines, "opentinker.access")
    assert line["request_id"] == "req-42.abc"
    assert line["org_id"] == str(acme.pk)
    assert (line["method"], line["route"], line["status"], line["level"]) == (
        "GET",
        "api/v1/jobs",
        200,
        "INFO",
    )
    assert line["message"] == "GET api/v1/jobs 200"
    assert line["duration_ms"] >= 0 and "job_id" not in line


def test_a_missing_or_malformed_request_id_is_replaced_by_a_fresh_one(json_lines):
    ids = set()
    for given in (None, "forged\nline", "x" * 129, "a b"):
        headers = {} if given is None else {"HTTP_X_REQUEST_ID": given}
        resp = Client().get("/healthz", **headers)
        assert resp.status_code == 200
        assert len(resp["X-Request-ID"]) == 32 and resp["X-Request-ID"] != given
        ids.add(resp["X-Request-ID"])
    assert len(ids) == 4
    lines = records(json_lines, "opentinker.access")
    assert {r["request_id"] for r in lines} == ids
    assert all("org_id" not in r for r in lines)  # nobody signed in: no organization


def test_a_runtime_report_logs_the_job_and_its_organization(json_lines, alice, acme):
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=example_rl_spec())
    job = job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))
    runtime = client_for(job_token_issue(job))
    resp = runtime.post(f"/api/v1/ingest/jobs/{job.id}/heartbeat", {}, format="json")
    assert resp.status_code == 200, resp.content
    (line,) = records(json_lines, "opentinker.access")
    assert (line["job_id"], line["org_id"]) == (str(job.pk), str(acme.pk))
    assert line["route"] == "api/v1/ingest/jobs/<str:job_id>/heartbeat"


def test_lines_logged_while_serving_carry_the_ids_and_nothing_leaks_after(json_lines):
    log = logging.getLogger("opentinker.test")
    with context.scope(request_id="r1"):
        context.bind(org_id=7, job_id="j-1")
        log.warning("inside %s", "the request", extra={"detail": {"n": 1}})
    log.warning("outside")
    inside, outside = records(json_lines, "opentinker.test")
    assert inside["message"] == "inside the request"
    assert (inside["request_id"], inside["org_id"], inside["job_id"]) == ("r1", "7", "j-1")
    assert inside["detail"] == {"n": 1}
    assert {"request_id", "org_id", "job_id"}.isdisjoint(outside)


def test_an_exception_is_one_line_of_json_with_its_traceback(json_lines):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("opentinker.test").exception("failed")
    (line,) = records(json_lines, "opentinker.test")
    assert line["level"] == "ERROR" and "ValueError: boom" in line["exc_info"]
    assert len(json_lines.getvalue().strip().splitlines()) == 1


@shared_task(name="tests.log_about_a_job")
def log_about_a_job(job_id: str) -> None:
    context.bind(job_id=job_id)
    logging.getLogger("opentinker.test").warning("working")


def test_a_celery_task_logs_its_name_id_and_the_job_it_binds(json_lines):
    result = log_about_a_job.apply(args=["job-9"], task_id="task-1")
    assert result.successful()
    (line,) = records(json_lines, "opentinker.test")
    assert (line["task"], line["task_id"], line["job_id"]) == ("tests.log_about_a_job", "task-1", "job-9")
    assert context.current() == {}  # the task's scope is closed once it returns


def test_log_format_json_configures_the_console_handler(monkeypatch, tmp_path):
    text = load_settings(monkeypatch, tmp_path / "t")
    assert "formatter" not in text["LOGGING"]["handlers"]["console"]  # today's plain lines by default
    assert text["LOGGING"]["loggers"]["opentinker.access"]["level"] == "WARNING"
    assert text["CELERY_WORKER_HIJACK_ROOT_LOGGER"] is True
    as_json = load_settings(monkeypatch, tmp_path / "j", LOG_FORMAT="json")
    assert as_json["LOGGING"]["handlers"]["console"]["formatter"] == "json"
    assert as_json["LOGGING"]["loggers"]["opentinker.access"]["level"] == "INFO"
    assert as_json["CELERY_WORKER_HIJACK_ROOT_LOGGER"] is False
    with pytest.raises(ImproperlyConfigured, match="LOG_FORMAT must be one of text, json; got 'xml'"):
        load_settings(monkeypatch, tmp_path / "x", LOG_FORMAT="xml")


# --- Sentry ---


def test_without_a_dsn_sentry_is_never_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentry_sdk", None)  # importing it now would raise
    assert sentry_init("", environment="embedded") is False


def test_a_dsn_without_the_package_stops_the_start_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentry_sdk", None)  # as if not installed
    with pytest.raises(ImproperlyConfigured, match="pip install sentry-sdk"):
        sentry_init("https://key@sentry.example/1", environment="production")


def test_a_dsn_starts_sentry_without_personal_data(monkeypatch):
    calls = []
    fake = types.ModuleType("sentry_sdk")
    fake.init = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]  # records, sends nothing
    monkeypatch.setitem(sys.modules, "sentry_sdk", fake)
    assert sentry_init("https://key@sentry.example/1", environment="production") is True
    assert calls == [
        {
            "dsn": "https://key@sentry.example/1",
            "environment": "production",
            "send_default_pii": False,
            "traces_sample_rate": 0.0,
        }
    ]


JSON_CHILD = """
import logging
import django
django.setup()
from portal.observability import context
with context.scope(request_id="r-9"):
    logging.getLogger("uvicorn.error").warning("server says %s", "hi")
    logging.getLogger("portal.something").warning("platform says hi")
"""


def test_a_process_started_with_log_format_json_writes_only_json_lines():
    """The configuration as a server process applies it (uvicorn's loggers go through the same handler)."""
    env = {**os.environ, "LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "portal.settings"}
    done = subprocess.run(
        [sys.executable, "-c", JSON_CHILD], env=env, cwd=BASE, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(r["logger"], r["message"], r["request_id"]) for r in lines] == [
        ("uvicorn.error", "server says hi", "r-9"),
        ("portal.something", "platform says hi", "r-9"),
    ]
