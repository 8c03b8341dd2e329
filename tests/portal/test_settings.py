"""Production settings come from the environment and pass Django's deployment checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BASE = Path(__file__).resolve().parents[2]

PRODUCTION = {
    "OPENTINKER_MODE": "production",
    "SECRET_KEY": "k" * 20 + "Zx9-Q2!vR7#pL4@mN8$tB6%yW3^cF1&hJ5*" + "s" * 10,
    "TOKEN_PEPPER": "p" * 40,
    "ALLOWED_HOSTS": "opentinker.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://opentinker.example.com",
    "OBJECT_STORE_URL": "s3://opentinker-artifacts/prod",
}


def _manage(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE, env=env, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_is_clean_in_production_mode():
    r = _manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "System check identified no issues" in r.stdout


def test_production_refuses_weak_or_missing_secrets():
    weak = _manage("check", **{**PRODUCTION, "SECRET_KEY": "short"})
    assert weak.returncode != 0 and "SECRET_KEY must be at least 50" in weak.stderr
    env = {k: v for k, v in os.environ.items() if k != "TOKEN_PEPPER"}
    missing = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=BASE,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **{k: v for k, v in PRODUCTION.items() if k != "TOKEN_PEPPER"}},
    )
    assert missing.returncode != 0 and "TOKEN_PEPPER must be set" in missing.stderr


def test_non_postgres_database_is_refused():
    r = _manage("check", DATABASE_URL="sqlite:///tmp/x.db")
    assert r.returncode != 0 and "PostgreSQL only" in r.stderr


def test_missing_database_url_explains_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    r = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=BASE,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "OPENTINKER_VAR_DIR": str(tmp_path)},
    )
    assert r.returncode != 0 and "manage.py opentinker up" in r.stderr
