"""Cookies, HSTS and proxy settings: strict in production, plain HTTP only in the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.portal.test_settings import BASE, PRODUCTION

NAMES = [
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SESSION_COOKIE_HTTPONLY",
    "SESSION_COOKIE_SAMESITE",
    "CSRF_COOKIE_SAMESITE",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_SSL_REDIRECT",
    "SECURE_PROXY_SSL_HEADER",
    "SECURE_CONTENT_TYPE_NOSNIFF",
    "X_FRAME_OPTIONS",
    "AUTHENTICATION_BACKENDS",
    "TOKEN_PEPPERS",
]


def _settings(**env: str) -> dict:
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        f"print(json.dumps({{n: getattr(s, n, None) for n in {NAMES!r}}}))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=BASE,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_production_has_secure_cookies_hsts_and_an_explicit_proxy_header():
    s = _settings(**PRODUCTION, DEBUG="true")  # DEBUG does not loosen any of them
    assert s == s | {
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "CSRF_COOKIE_SAMESITE": "Lax",
        "SECURE_HSTS_SECONDS": 31_536_000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_SSL_REDIRECT": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "SECURE_CONTENT_TYPE_NOSNIFF": True,
        "X_FRAME_OPTIONS": "DENY",
        "AUTHENTICATION_BACKENDS": ["portal.auth_backends.ThrottledModelBackend"],
    }
    # A server that faces clients itself trusts no forwarded header.
    assert _settings(**PRODUCTION, SECURE_PROXY_SSL_HEADER="")["SECURE_PROXY_SSL_HEADER"] is None


def test_embedded_default_serves_plain_http_without_trusting_forwarded_headers():
    s = _settings(OPENTINKER_MODE="embedded")
    assert (s["SESSION_COOKIE_SECURE"], s["CSRF_COOKIE_SECURE"], s["SECURE_PROXY_SSL_HEADER"]) == (
        False,
        False,
        None,
    )
    assert s["SESSION_COOKIE_HTTPONLY"] is True and s["SESSION_COOKIE_SAMESITE"] == "Lax"


def test_production_rotated_peppers_must_each_be_long():
    peppers = "new:" + "n" * 40 + ",old:" + "o" * 40
    env = {k: v for k, v in PRODUCTION.items() if k != "TOKEN_PEPPER"}
    assert list(_settings(**env, TOKEN_PEPPERS=peppers)["TOKEN_PEPPERS"]) == ["new", "old"]
    r = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=BASE,
        env={**os.environ, **env, "TOKEN_PEPPERS": "new:short," + "old:" + "o" * 40},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "TOKEN_PEPPER must be at least 32" in r.stderr
