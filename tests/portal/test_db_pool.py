"""DB_POOL_MAX_SIZE: each process borrows connections from a psycopg pool (the production server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BASE = Path(__file__).resolve().parents[2]
PROBE = (
    "from django.db import connection\n"
    "from django.conf import settings\n"
    "with connection.cursor() as c: c.execute('select 1')\n"
    "print(settings.DATABASES['default']['OPTIONS']['pool'], connection.pool is not None)\n"
)


def _shell(**extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", PROBE],
        cwd=BASE,
        env={**os.environ, **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pooled_connections_serve_queries(db):
    r = _shell(DB_POOL_MAX_SIZE="3", DB_CONN_MAX_AGE="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("'max_size': 3, 'timeout': 10} True"), r.stdout


def test_pool_and_persistent_connections_exclude_each_other(db):
    r = _shell(DB_POOL_MAX_SIZE="3", DB_CONN_MAX_AGE="60")
    assert r.returncode != 0 and "exclude each other" in r.stderr
