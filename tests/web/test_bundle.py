"""The pages' built front-end bundle: its absence stops the web server at start-up, with the fix named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from portal.web import checks

BASE = Path(__file__).resolve().parents[2]


def test_the_built_bundle_is_complete_and_the_system_check_passes():
    assert checks.bundle_missing() == []
    assert checks.check_bundle() == []


def test_a_missing_bundle_is_a_clear_error(tmp_path):
    (tmp_path / "app.js").write_text("")
    assert checks.bundle_missing(tmp_path) == ["job.js", "compare.js", "app.css", "htmx.min.js"]
    with pytest.raises(
        ImproperlyConfigured,
        match=r"bundle is missing .*\(job.js, compare.js, app.css, htmx.min.js\): build it with `make",
    ):
        checks.require_bundle(tmp_path)


def test_the_asgi_app_refuses_to_start_without_it(tmp_path, monkeypatch):
    # A copy of the package layout whose dist/ is empty: importing portal.asgi must fail, naming the fix.
    code = (
        "import portal.web.checks as c, pathlib, sys; c.DIST = pathlib.Path(sys.argv[1]);import portal.asgi"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=BASE, env=env, capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "the portal's front-end bundle is missing" in r.stderr and "make frontend" in r.stderr
