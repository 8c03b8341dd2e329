"""Every platform setting is declared once, in portal/settings.py: read from the environment with its type,
default and validation, documented by one row of the README's configuration table, and read as
``settings.X`` everywhere else (no second default that could drift, no ``os.environ`` read at each use).
"""

from __future__ import annotations

import ast
import math
import re
import runpy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from portal import env as env_module
from tests.portal.test_settings import PRODUCTION

BASE = Path(__file__).resolve().parents[2]
SETTINGS = BASE / "portal" / "settings.py"
README = BASE / "README.md"
PLATFORM = ("portal", "api", "workers", "env_registry")
# The loader (the only reader of the process environment) and the declarations themselves.
ENV_READERS = {"portal/env.py", "portal/settings.py"}
ENV_METHODS = ("get", "str", "bool", "int", "list", "seconds", "choice", "rate", "command", "mapping")


def declared_names() -> list[str]:
    """The variables settings.py reads, in order: every ``env.<method>("NAME", ...)`` call."""
    names = []
    for node in ast.walk(ast.parse(SETTINGS.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("env", "_probe")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def readme_rows() -> dict[str, str]:
    """The README's platform settings table: variable -> its default cell (one variable a row)."""
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    table = section[section.index("| variable |") :].split("\n\n", 1)[0].splitlines()[2:]
    rows: dict[str, str] = {}
    for line in table:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"not a row of three cells: {line}"
        m = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        assert m, f"the first cell must be one variable in backticks: {cells[0]!r}"
        assert m[1] not in rows, f"{m[1]} has two rows"
        rows[m[1]] = cells[2]
    return rows


def load_settings(monkeypatch, tmp_path, **env: str) -> dict[str, Any]:
    """Run settings.py afresh (not Django's copy) with these variables over a clean environment."""
    for name in declared_names():
        if name not in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENTINKER_VAR_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(SETTINGS))


def recorded_defaults(monkeypatch, tmp_path, **env: str) -> dict[str, Any]:
    """The default each variable is declared with, as settings.py passes it to the loader."""
    seen: dict[str, Any] = {}
    for method in ("str", "bool", "int", "list", "seconds", "choice", "rate"):
        original = getattr(env_module.Env, method)

        def recording(self, key, default=None, *args, _original=original, **kwargs):
            seen.setdefault(key, default)
            return _original(self, key, default, *args, **kwargs)

        monkeypatch.setattr(env_module.Env, method, recording)
    load_settings(monkeypatch, tmp_path, **env)
    return seen


def as_readme(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    if isinstance(value, int | str):
        return str(value)
    return None  # lists, computed values: described in words


def test_each_variable_is_read_once_in_settings():
    twice = sorted(name for name, n in Counter(declared_names()).items() if n > 1)
    assert twice == []


def test_the_readme_table_has_one_row_per_declared_setting_and_no_other():
    declared, documented = set(declared_names()), set(readme_rows())
    assert sorted(declared - documented) == [], "declared in portal/settings.py but not in the README table"
    assert sorted(documented - declared) == [], "in the README table but not declared in portal/settings.py"


def test_the_readme_defaults_are_the_declared_ones(monkeypatch, tmp_path):
    embedded = recorded_defaults(monkeypatch, tmp_path / "embedded")
    production = recorded_defaults(monkeypatch, tmp_path / "production", **PRODUCTION)
    checked, wrong = 0, {}
    for name, cell in readme_rows().items():
        literal = re.fullmatch(r"`([^`]*)`", cell)
        declared = embedded[name] if name in embedded else production.get(name)
        if literal is None or as_readme(declared) is None:
            continue
        checked += 1
        if literal[1] != as_readme(declared):
            wrong[name] = (literal[1], as_readme(declared))
    assert wrong == {}, "README default != declared default"
    assert checked >= 40  # the check covers most of the table


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "OPENTINKER_HEARTBEAT_TIMEOUT_S",
            "thirty",
            "must be a number of seconds >= 0 (or inf), got 'thirty'",
        ),
        ("OPENTINKER_RESERVE_AFTER_S", "nan", "must be a number of seconds >= 0 (or inf), got 'nan'"),
        ("OPENTINKER_LAUNCH_TIMEOUT_S", "-1", "must be a number of seconds >= 0 (or inf), got '-1'"),
        # A credential that never expires is what the bootstrap token exists to avoid.
        ("OPENTINKER_BOOTSTRAP_TTL_S", "inf", "must be a finite number of seconds >= 0, got 'inf'"),
        ("OPENTINKER_BOOTSTRAP_TTL_S", "soon", "must be a finite number of seconds >= 0, got 'soon'"),
        ("OPENTINKER_BOOTSTRAP_TTL_S", "-5", "must be a number of seconds >= 0 (or inf), got '-5'"),
        ("LIVE_POLL_SECONDS", "0", "must be a number of seconds > 0, got '0'"),
        ("OPENTINKER_SCHEDULE_EVERY_S", "inf", "must be a finite number of seconds >= 0, got 'inf'"),
        ("ENV_ARCHIVE_MAX_BYTES", "20MB", "must be an integer, got '20MB'"),
        ("ENV_ARCHIVE_MAX_BYTES", "0", "must be an integer >= 1, got '0'"),
        ("ENV_ARCHIVE_MAX_BYTES", "20971521", "must be an integer <= 20971520, got '20971521'"),
        ("TRUSTED_PROXIES", "-1", "must be an integer >= 0, got '-1'"),
        ("OPENTINKER_JOB_MAX_RETRIES", "three", "must be an integer, got 'three'"),
        ("DEBUG", "maybe", "must be a boolean (true/false), got 'maybe'"),
        ("ENV_VALIDATION_MODE", "later", "must be one of inline, celery; got 'later'"),
        ("LOG_LEVEL", "loud", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got 'loud'"),
        ("INGEST_RATE_LIMIT", "fast", "must be a rate like 100/s or 1200/min, got 'fast'"),
        ("API_RATE_LIMIT", "1200", "must be a rate like 100/s or 1200/min, got '1200'"),
        ("OPENTINKER_RUNTIME_COMMAND", "python -m x", "must be a JSON list of strings"),
        ("OPENTINKER_RAY_RUNTIME_COMMAND", "[]", "must be a JSON list of strings"),
        ("OPENTINKER_RAY_ENV_VARS", '{"N": 1}', "must be a JSON object of strings"),
    ],
)
def test_a_bad_value_stops_the_start_with_an_error_naming_the_variable(
    monkeypatch, tmp_path, name, value, message
):
    with pytest.raises(ImproperlyConfigured) as e:
        load_settings(monkeypatch, tmp_path, **{name: value})
    assert str(e.value).startswith(f"{name} {message}")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 300.0), ("", 300.0), ("45", 45.0), ("7.5", 7.5), ("0", 0.0), ("inf", math.inf)],
)
def test_a_duration_is_seconds_or_inf_and_an_empty_variable_is_the_default(
    monkeypatch, tmp_path, value, seconds
):
    env = {} if value is None else {"OPENTINKER_RESERVE_AFTER_S": value}
    assert load_settings(monkeypatch, tmp_path, **env)["OPENTINKER_RESERVE_AFTER_S"] == seconds


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "-inf"])
def test_a_bad_duration_is_shown_as_given(monkeypatch, tmp_path, value):
    with pytest.raises(ImproperlyConfigured) as e:
        load_settings(monkeypatch, tmp_path, OPENTINKER_RESERVE_AFTER_S=value)
    assert (
        str(e.value) == f"OPENTINKER_RESERVE_AFTER_S must be a number of seconds >= 0 (or inf), got {value!r}"
    )


def test_values_from_the_environment_are_typed(monkeypatch, tmp_path):
    s = load_settings(
        monkeypatch,
        tmp_path,
        OPENTINKER_RUNTIME_COMMAND='["/opt/py/bin/python", "-m", "gpu_runtime", "run"]',
        OPENTINKER_RAY_ENV_VARS='{"HF_HOME": "/cache"}',
        OPENTINKER_RESERVE_AFTER_S="inf",
        OPENTINKER_HEARTBEAT_TIMEOUT_S="7.5",
        OPENTINKER_JOB_MAX_RETRIES="0",
        OPENTINKER_LOCAL_POOL="",
        OPENTINKER_RUNTIME_PASS_ENV="HF_TOKEN, WANDB_API_KEY",
        ENV_ARCHIVE_MAX_BYTES="1048576",
        INGEST_RATE_LIMIT="10/second",
    )
    assert s["OPENTINKER_RUNTIME_COMMAND"] == ["/opt/py/bin/python", "-m", "gpu_runtime", "run"]
    assert s["OPENTINKER_RAY_ENV_VARS"] == {"HF_HOME": "/cache"}
    assert s["OPENTINKER_RESERVE_AFTER_S"] == math.inf
    assert s["OPENTINKER_HEARTBEAT_TIMEOUT_S"] == 7.5
    assert s["OPENTINKER_JOB_MAX_RETRIES"] == 0
    assert s["OPENTINKER_LOCAL_POOL"] == ""
    assert s["OPENTINKER_RUNTIME_PASS_ENV"] == ["HF_TOKEN", "WANDB_API_KEY"]
    assert s["ENV_ARCHIVE_MAX_BYTES"] == 1048576
    assert s["INGEST_RATE_LIMIT"] == "10/second"


def test_embedded_and_production_defaults_differ_where_documented(monkeypatch, tmp_path):
    embedded = load_settings(monkeypatch, tmp_path / "embedded")
    production = load_settings(monkeypatch, tmp_path / "production", **PRODUCTION)
    assert (embedded["OPENTINKER_LOCAL_POOL"], production["OPENTINKER_LOCAL_POOL"]) == ("local", "")
    assert (embedded["ENV_VALIDATION_MODE"], production["ENV_VALIDATION_MODE"]) == ("inline", "celery")
    assert embedded["OPENTINKER_JOBS_DIR"] == str(tmp_path / "embedded" / "jobs")


def _reads_outside_settings(path: Path) -> list[str]:
    """``os.environ.get("X")``, ``os.environ["X"]``, ``os.getenv`` and ``getattr(settings, X, default)``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        text = ast.unparse(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            func = ast.unparse(node.func)
            defaulted = func == "getattr" and len(node.args) == 3 and ast.unparse(node.args[0]) == "settings"
            if defaulted or func in ("os.environ.get", "os.getenv"):
                found.append(text)
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and ast.unparse(node.value) == "os.environ"
            and isinstance(node.slice, ast.Constant)
        ):
            found.append(text)
    return found


def test_the_platform_reads_settings_only_through_django_settings():
    reads = {}
    for package in PLATFORM:
        for path in sorted((BASE / package).rglob("*.py")):
            rel = path.relative_to(BASE).as_posix()
            if rel not in ENV_READERS and (found := _reads_outside_settings(path)):
                reads[rel] = found
    assert reads == {}


def test_the_scan_sees_each_kind_of_read(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom django.conf import settings\n"
        "a = os.environ.get('A')\nb = os.environ['B']\nc = os.getenv('C')\n"
        "d = getattr(settings, 'D', 1)\n"
        "ok = settings.F\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'portal.settings')\n"
    )
    assert len(_reads_outside_settings(sample)) == 4
