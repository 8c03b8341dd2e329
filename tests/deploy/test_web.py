"""deploy/web.py, the production web server: uvicorn workers sharing nothing but PostgreSQL and Valkey, each
with a pool of database connections, serve the API; every worker refuses a revoked token within seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.utils import timezone

from deploy.web import command, environment
from portal.models import ApiToken
from tests.uvicorn_ready import wait_listening

BASE = Path(__file__).resolve().parents[2]


def test_environment_sets_a_pool_and_empties_the_metrics_directory(tmp_path):
    stale = tmp_path / "prom" / "counter_123.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    env = environment({"PROMETHEUS_MULTIPROC_DIR": str(stale.parent)})
    assert env["DB_POOL_MAX_SIZE"] == "8" and env["DB_CONN_MAX_AGE"] == "0"
    assert env["API_AUTH_CACHE_SECONDS"] == "2"
    assert stale.parent.is_dir() and not stale.exists()
    assert environment({"DB_POOL_MAX_SIZE": "20"})["DB_POOL_MAX_SIZE"] == "20"  # the operator's value wins


def _database_url() -> str:
    db = settings.DATABASES["default"]  # the test database, so the server sees the tokens made here
    return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_production_server_serves_the_api_and_honours_revocation(alice, acme, make_token, tmp_path):
    secret = make_token(alice, acme)
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        # The wait for the revocation below asks as fast as the server answers: no rate limit in the way.
        "API_RATE_LIMIT": "100000/min",
    }
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        command("127.0.0.1", port, 2, log_level="info"),
        cwd=BASE,
        env=environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_listening(server, sink=log, workers=2, port=port)
        headers = {"Authorization": f"Bearer {secret}"}
        # New connections each time: the requests spread over both workers and reuse their pools.
        for _ in range(6):
            assert httpx.get(f"{base}/api/v1/jobs?limit=20", headers=headers, timeout=60).status_code == 200
        # Revoked behind the workers' backs (update() sends no signal): each worker refuses the token once its
        # API_AUTH_CACHE_SECONDS entry (2 s) ends. Done when 6 requests in a row are refused (each waits for
        # the server's answer); the deadline only bounds a broken server.
        ApiToken.objects.filter(user=alice).update(revoked_at=timezone.now())
        deadline, refused = time.monotonic() + 60, 0
        while refused < 6:
            assert time.monotonic() < deadline, "the revoked token is still accepted"
            r = httpx.get(f"{base}/api/v1/jobs?limit=20", headers=headers, timeout=10)
            assert r.status_code in (200, 401)
            refused = refused + 1 if r.status_code == 401 else 0
    finally:
        server.terminate()
        server.wait(30)
        log.close()
