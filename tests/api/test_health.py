"""Liveness (/healthz, /livez) and readiness (/readyz): what a probe sees when each dependency is up or not.

Readiness is 200 with every check when PostgreSQL, Valkey and the object store answer and beat and a worker
were seen recently; 503 naming each failing check's reason otherwise. Valkey is made unreachable by pointing
REDIS_URL at a loopback port that is bound but not listening; the object store is missing by pointing it
under a regular file (or at a bucket that does not exist on the test's S3 server). Public: no credentials.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.test import Client

from portal import health

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_heartbeats() -> Iterator[None]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(health.BEAT_KEY, health.WORKER_KEY)
    yield
    client.delete(health.BEAT_KEY, health.WORKER_KEY)
    client.close()


def beats(beat_age: float | None = 0, worker_age: float | None = 0) -> None:
    """Heartbeats as beat and a worker leave them (workers/health.py), `age` seconds ago."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key, age, who in ((health.BEAT_KEY, beat_age, "beat@box"), (health.WORKER_KEY, worker_age, "w1@box")):
        if age is not None:
            client.set(key, f"{time.time() - age:.3f} {who}")
    client.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound by nobody listening: a connection there is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def ready() -> tuple[int, dict]:
    resp = Client().get("/readyz")
    assert resp["Content-Type"] == "application/json" and resp["Cache-Control"] == "no-store"
    return resp.status_code, resp.json()


def seconds_ago(detail: str, template: str) -> int:
    """The age a detail reports, which must read as `template` around it (a slow box may add a second)."""
    m = re.fullmatch(re.escape(template).replace(re.escape("{}"), r"(\d+)"), detail)
    assert m, (detail, template)
    age = int(m[1])
    assert age < 3600 * 2
    return age


def failing(body: dict) -> dict[str, str]:
    return {name: reasons[0] for name, reasons in body["error"]["fields"].items()}


def test_liveness_needs_nothing_but_the_process(settings, closed_port):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port}/0"  # not even Valkey
    for path in ("/healthz", "/livez"):
        resp = Client().get(path)
        assert (resp.status_code, resp.json()) == (200, {"status": "ok"})


def test_probes_answer_json_only():
    resp = Client().get("/livez", HTTP_ACCEPT="text/html")
    assert resp.status_code == 406 and resp.json()["error"]["code"] == "not_acceptable"


def test_ready_when_everything_answers(tmp_path, settings):
    settings.OBJECT_STORE_URL = f"file://{tmp_path / 'objects'}"  # not there yet: writes create it
    beats(beat_age=3, worker_age=10)
    status, body = ready()
    assert status == 200, body
    assert body["status"] == "ready" and "error" not in body
    checks = body["checks"]
    assert set(checks) == {"database", "valkey", "beat", "worker", "object_store"}
    assert all(c["ok"] for c in checks.values())
    assert seconds_ago(checks["beat"]["detail"], "seen {} s ago (beat@box)") >= 3
    assert seconds_ago(checks["worker"]["detail"], "seen {} s ago (w1@box)") >= 10
    assert list((tmp_path / "objects").iterdir()) == []  # the probe file is gone


def test_not_ready_when_valkey_is_unreachable(settings, closed_port):
    beats()
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port}/0"
    status, body = ready()
    assert status == 503
    assert body["status"] == "not_ready" and body["error"]["code"] == "not_ready"
    reasons = failing(body)
    assert set(reasons) == {"valkey", "beat", "worker"}
    assert reasons["valkey"].startswith("Valkey unreachable: ConnectionError")
    assert reasons["beat"] == "unknown: its heartbeat lives in Valkey, which is unreachable"
    assert body["error"]["message"] == "not ready: valkey, beat, worker"
    assert body["checks"]["database"]["ok"] and body["checks"]["object_store"]["ok"]


def test_not_ready_when_the_file_store_is_missing(settings, tmp_path):
    beats()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's parent directory should be")
    settings.OBJECT_STORE_URL = f"file://{blocker}/objects"
    status, body = ready()
    assert status == 503
    reasons = failing(body)
    assert set(reasons) == {"object_store"}
    assert reasons["object_store"].startswith("the file:// store is not usable: ")


def test_s3_store_ready_and_missing_bucket(s3_store, settings):
    beats()
    status, body = ready()
    assert status == 200, body
    assert body["checks"]["object_store"]["detail"] == "the s3:// store's bucket otk-store answers"

    settings.OBJECT_STORE_URL = "s3://no-such-bucket/store"
    status, body = ready()
    assert status == 503
    reasons = failing(body)
    assert set(reasons) == {"object_store"}
    assert reasons["object_store"].startswith("the s3:// store is not usable: ClientError")


def test_not_ready_without_a_recent_worker(settings):
    beats(beat_age=1, worker_age=None)  # never seen
    status, body = ready()
    assert status == 503
    assert failing(body) == {"worker": "no Celery worker (finished no task) never seen, or not for a day"}

    settings.HEALTH_MAX_SILENCE_S = 30
    beats(beat_age=1, worker_age=600)  # seen, but too long ago
    status, body = ready()
    assert status == 503
    reasons = failing(body)
    assert set(reasons) == {"worker"}
    template = "no Celery worker (finished no task) in the last 30 s: last seen {} s ago (w1@box)"
    assert seconds_ago(reasons["worker"], template) >= 600
    assert body["checks"]["beat"]["ok"]


def test_not_ready_without_beat():
    beats(beat_age=3600, worker_age=0)
    status, body = ready()
    assert status == 503
    reasons = failing(body)
    assert set(reasons) == {"beat"}
    template = "Celery beat (published no periodic task) in the last 60 s: last seen {} s ago (beat@box)"
    assert seconds_ago(reasons["beat"], template) >= 3600


def test_heartbeats_as_workers_write_them():
    health.heartbeat_record(health.WORKER_KEY, "celery@w2")
    client = redis.Redis.from_url(settings.REDIS_URL)
    at, who = client.get(health.WORKER_KEY).decode().split(" ")
    assert who == "celery@w2" and abs(float(at) - time.time()) < 3600
    assert 0 < client.ttl(health.WORKER_KEY) <= health.KEY_TTL_S
    client.close()


def test_probes_are_not_redirected_to_https_in_production():
    # A probe's plain-HTTP request redirected to HTTPS would read as success (any 3xx passes a kubelet probe).
    from tests.portal.test_settings import PRODUCTION, _manage

    script = (
        "from django.test import Client; c = Client(HTTP_HOST='opentinker.example.com'); "
        "print([c.get(p).status_code for p in ('/livez', '/healthz', '/api/v1/me')])"
    )
    r = _manage("shell", "-c", script, **PRODUCTION)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[200, 200, 301]"
