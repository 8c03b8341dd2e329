"""Unit tests of the CLI: the client factory is injected so every request goes to a MockTransport."""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from opentinker.cli import main
from opentinker.client import Client
from opentinker.spec import example_rl_spec

from .test_client_unit import (
    BASE,
    CHECKPOINT_BYTES,
    CHECKPOINTS,
    ME,
    TOKEN,
    TOKEN_JSON,
    FakeApi,
    api_error,
    job_json,
    ok,
    page,
)

Run = Callable[..., int]


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cfg" / "opentinker" / "config.json"
    monkeypatch.setenv("OPENTINKER_CONFIG", str(path))
    monkeypatch.delenv("OPENTINKER_URL", raising=False)
    monkeypatch.delenv("OPENTINKER_TOKEN", raising=False)
    return path


@pytest.fixture
def factory_calls() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def cli(api: FakeApi, config_file: Path, factory_calls: list[tuple[str, str]]) -> Run:
    def factory(url: str, token: str) -> Client:
        factory_calls.append((url, token))
        return Client(url, token, transport=httpx.MockTransport(api), backoff=0)

    def run(*argv: str) -> int:
        return main(list(argv), client_factory=factory)

    return run


@pytest.fixture
def logged_in(config_file: Path) -> Path:
    config_file.parent.mkdir(parents=True)
    config_file.write_text(json.dumps({"url": BASE, "token": TOKEN}))
    return config_file


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(example_rl_spec().model_dump(mode="json")))
    return path


def lines(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


# --- login / logout / whoami -----------------------------------------------------------------------------


def test_login_verifies_then_saves_a_private_config(
    cli: Run, api: FakeApi, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/me", ok(ME))
    assert cli("login", "--url", BASE, "--token", TOKEN) == 0
    assert api.last.url.path == "/api/v1/me"
    assert api.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(config_file.read_text()) == {"url": BASE, "token": TOKEN}
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert [p.name for p in config_file.parent.iterdir()] == ["config.json"]  # no temp file left behind
    out = capsys.readouterr()
    assert out.out.startswith(f"Logged in to {BASE} as alice in acme.")
    assert out.err == ""


def test_login_reads_the_token_from_stdin(
    cli: Run, api: FakeApi, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("otk_piped_secret\n"))
    monkeypatch.setenv("OPENTINKER_URL", "https://env.test")
    api.on("GET", "/me", ok(ME))
    assert cli("login") == 0
    assert json.loads(config_file.read_text()) == {"url": "https://env.test", "token": "otk_piped_secret"}


def test_login_overwrites_an_existing_config_and_keeps_it_private(
    cli: Run, api: FakeApi, logged_in: Path
) -> None:
    logged_in.chmod(0o644)
    api.on("GET", "/me", ok(ME))
    assert cli("login", "--token", "otk_new_token") == 0  # URL defaults to the saved one
    assert json.loads(logged_in.read_text()) == {"url": BASE, "token": "otk_new_token"}
    assert stat.S_IMODE(logged_in.stat().st_mode) == 0o600


def test_login_with_a_bad_token_saves_nothing(
    cli: Run, api: FakeApi, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/me", api_error(401, "not_authenticated", "Invalid or revoked token."))
    assert cli("login", "--url", BASE, "--token", "otk_bad_x") == 1
    assert not config_file.exists()
    err = capsys.readouterr().err
    assert err == "error: Invalid or revoked token (HTTP 401)\n"


def test_login_warns_about_plain_http(cli: Run, api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.on("GET", "/me", ok(ME))
    assert cli("login", "--url", "http://api.test", "--token", TOKEN) == 0
    assert "not https" in capsys.readouterr().err


def test_login_with_an_empty_token_is_a_usage_error(
    cli: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli("login", "--url", BASE) == 2
    assert capsys.readouterr().err == "error: no token given\n"


def test_logout_removes_the_config(cli: Run, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("logout") == 0
    assert not logged_in.exists()
    assert cli("logout") == 0
    assert lines(capsys.readouterr().out)[-1] == "Not logged in."


def test_whoami(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on("GET", "/me", ok(ME))
    assert cli("whoami") == 0
    out = capsys.readouterr().out
    assert "username:     alice" in out
    assert "organization: acme (Acme Corp)" in out
    assert "scopes:       jobs:read jobs:write" in out
    assert f"server:       {BASE}/api/v1" in out


def test_not_logged_in(cli: Run, api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("jobs", "list") == 1
    assert capsys.readouterr().err.startswith("error: not logged in: run `opentinker login`")
    assert api.requests == []


def test_env_vars_override_the_config_file(
    cli: Run,
    api: FakeApi,
    logged_in: Path,
    factory_calls: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api.on("GET", "/me", ok(ME))
    monkeypatch.setenv("OPENTINKER_TOKEN", "otk_env_token")
    assert cli("whoami") == 0
    monkeypatch.setenv("OPENTINKER_URL", "https://other.test")
    assert cli("whoami") == 0
    assert factory_calls == [(BASE, "otk_env_token"), ("https://other.test", "otk_env_token")]


# --- jobs ------------------------------------------------------------------------------------------------


def test_jobs_submit(
    cli: Run, api: FakeApi, logged_in: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("POST", "/jobs", ok(job_json(), 201))
    assert cli("jobs", "submit", str(spec_file)) == 0
    assert json.loads(api.last.content) == example_rl_spec().model_dump(mode="json")
    assert capsys.readouterr().out == f"Submitted job {job_json()['id']} (arithmetic-grpo): queued\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_flag_before_or_after_the_command(
    cli: Run, api: FakeApi, logged_in: Path, spec_file: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    api.on("POST", "/jobs", ok(job_json(), 201))
    argv = ["jobs", "submit", str(spec_file)]
    assert cli(*(["--json", *argv] if where == "before" else [*argv, "--json"])) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["id"] == job_json()["id"] and printed["state"] == "queued"
    assert printed["created_at"].startswith("2025-03-01T12:00:00")


def test_jobs_submit_invalid_spec_exits_2_without_a_request(
    cli: Run, api: FakeApi, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "kind: rl\nmodel: {base: tiny-qwen2}\nenvironment: {ref: a/b@1.0.0}\nalgorithm: {steps: 0}\n"
    )
    assert cli("jobs", "submit", str(bad)) == 2
    assert api.requests == []
    err = capsys.readouterr().err
    assert err == "error: invalid job spec: algorithm.steps: Input should be greater than or equal to 1\n"
    assert cli("jobs", "submit", str(tmp_path / "missing.yaml")) == 2
    assert "error: cannot read" in capsys.readouterr().err


def test_jobs_submit_server_validation_error_exits_2(
    cli: Run, api: FakeApi, logged_in: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on(
        "POST",
        "/jobs",
        api_error(400, "invalid", "Invalid job spec.", {"resources.pool": ["Pool 'x' is not allowed."]}),
    )
    assert cli("jobs", "submit", str(spec_file)) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: Invalid job spec: resources.pool: Pool 'x' is not allowed (HTTP 400)\n"
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(("final", "code"), [("succeeded", 0), ("failed", 1)])
def test_jobs_submit_wait(
    cli: Run,
    api: FakeApi,
    logged_in: Path,
    spec_file: Path,
    capsys: pytest.CaptureFixture[str],
    final: str,
    code: int,
) -> None:
    job_id = job_json()["id"]
    api.on("POST", "/jobs", ok(job_json(), 201))
    api.on(
        "GET", f"/jobs/{job_id}", ok(job_json(state="running")), ok(job_json(state=final, state_reason=""))
    )
    transition = {
        "seq": 1,
        "kind": "state",
        "created_at": "2025-03-01T12:00:01Z",
        "from_state": "queued",
        "to_state": "admitted",
        "message": "admitted to pool cpu",
    }
    api.on(
        "GET", f"/jobs/{job_id}/events", ok({"results": [transition], "next_after": 1}), ok({"results": []})
    )
    assert cli("jobs", "submit", str(spec_file), "--wait", "--poll-interval", "0") == code
    out = lines(capsys.readouterr().out)
    assert out[1] == "2025-03-01 12:00:01  state  queued -> admitted  admitted to pool cpu"
    assert out[-1] == f"Job {job_id} {final}"


def test_jobs_list_table(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = [job_json(id="j1", state="running", gpus=2), job_json(id="j2", name="sft-run", kind="sft")]
    api.on("GET", "/jobs", ok(page(jobs, count=12)))
    assert cli("jobs", "list", "--state", "running", "--kind", "rl", "--limit", "2") == 0
    assert dict(api.last.url.params) == {"state": "running", "kind": "rl", "limit": "2", "offset": "0"}
    captured = capsys.readouterr()
    assert lines(captured.out) == [
        "ID  NAME             KIND  STATE    GPUS  CREATED (UTC)",
        "j1  arithmetic-grpo  rl    running  2     2025-03-01 12:00:00",
        "j2  sft-run          sft   queued   0     2025-03-01 12:00:00",
    ]
    assert "showing 1-2 of 12" in captured.err


def test_jobs_list_empty(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on("GET", "/jobs", ok(page([])))
    assert cli("jobs", "list") == 0
    assert capsys.readouterr().out == "No jobs.\n"


def test_jobs_show(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on("GET", "/jobs/j1", ok(job_json(id="j1", state="failed", state_reason="OOM")))
    assert cli("jobs", "show", "j1") == 0
    out = capsys.readouterr().out
    assert "state:        failed (OOM)" in out
    assert "spec:\n  spec_version: 1\n  kind: rl\n" in out
    assert "    base: tiny-qwen2" in out


def test_jobs_not_found(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on("GET", "/jobs/nope", api_error(404, "not_found", "Job not found."))
    assert cli("jobs", "show", "nope") == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "error: Job not found (HTTP 404)\n")


def test_jobs_cancel(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on("POST", "/jobs/j1/cancel", ok(job_json(id="j1", state="cancelling")))
    assert cli("jobs", "cancel", "j1", "--reason", "bad lr") == 0
    assert json.loads(api.last.content) == {"reason": "bad lr"}
    assert capsys.readouterr().out == "Cancel requested for job j1: now cancelling\n"


def test_jobs_cancel_conflict(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("POST", "/jobs/j1/cancel", api_error(409, "conflict", "Job already finished."))
    assert cli("jobs", "cancel", "j1") == 1
    assert json.loads(api.last.content) == {"reason": ""}
    assert capsys.readouterr().err == "error: Job already finished (HTTP 409)\n"


def test_jobs_metrics(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = {
        "series": [
            {"name": "reward", "steps": [1, 2, 3], "values": [0.25, None, 0.75], "downsampled": False},
            {"name": "loss", "steps": [10], "values": [1.5], "downsampled": True},
        ]
    }
    api.on("GET", "/jobs/j1/metrics", ok(body))
    assert cli("jobs", "metrics", "j1", "--name", "reward", "--name", "loss") == 0
    assert api.last.url.params.multi_items() == [("name", "reward"), ("name", "loss")]
    assert [cells(line) for line in lines(capsys.readouterr().out)] == [
        ["NAME", "POINTS", "LAST STEP", "LAST", "MIN", "MAX"],
        ["reward", "3", "3", "0.75", "0.25", "0.75"],
        ["loss (downsampled)", "1", "10", "1.5", "1.5", "1.5"],
    ]


def test_jobs_events(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        {
            "seq": 1,
            "kind": "state",
            "created_at": "2025-03-01T12:00:01Z",
            "actor": "scheduler",
            "from_state": "queued",
            "to_state": "admitted",
            "message": "",
            "data": {},
        },
        {
            "seq": 2,
            "kind": "log",
            "created_at": "2025-03-01T12:00:02+02:00",
            "actor": None,
            "from_state": None,
            "to_state": None,
            "message": "step 1\nreward 0.5",
            "data": {"step": 1},
        },
    ]
    api.on("GET", "/jobs/j1/events", ok({"results": events, "next_after": None}))
    assert cli("jobs", "events", "j1") == 0
    assert [cells(line) for line in lines(capsys.readouterr().out)] == [
        ["SEQ", "TIME (UTC)", "KIND", "TRANSITION", "MESSAGE"],
        ["1", "2025-03-01 12:00:01", "state", "queued -> admitted", "-"],
        ["2", "2025-03-01 10:00:02", "log", "-", "step 1 reward 0.5"],
    ]
    assert cli("--json", "jobs", "events", "j1", "--after", "0") == 0
    assert [e["seq"] for e in json.loads(capsys.readouterr().out)] == [1, 2]
    assert api.last.url.params["after"] == "0"


def test_jobs_checkpoints(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/jobs/j1/checkpoints", ok(CHECKPOINTS))
    assert cli("jobs", "checkpoints", "j1") == 0
    assert [cells(line) for line in lines(capsys.readouterr().out)] == [
        ["ID", "STEP", "CREATED (UTC)", "SIZE", "FILES"],
        ["ck1", "5", "2025-03-01 12:05:00", "6.8 KiB", "adapter.safetensors"],
    ]


def test_jobs_download_verifies_the_checksum(
    cli: Run, api: FakeApi, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/jobs/j1/checkpoints", ok(CHECKPOINTS))
    api.on(
        "GET",
        "/jobs/j1/checkpoints/ck1/files/adapter.safetensors",
        httpx.Response(200, content=CHECKPOINT_BYTES),
    )
    out_dir = tmp_path / "downloads"
    out_dir.mkdir()
    assert cli("jobs", "download", "j1", "ck1", "adapter.safetensors", "-o", str(out_dir)) == 0
    dest = out_dir / "adapter.safetensors"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == CHECKPOINTS["results"][0]["files"][0]["sha256"]
    assert capsys.readouterr().out == f"Saved adapter.safetensors (6.8 KiB) to {dest}, sha256 verified\n"


def test_jobs_download_corrupt_file(
    cli: Run, api: FakeApi, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/jobs/j1/checkpoints", ok(CHECKPOINTS))
    api.on("GET", "/jobs/j1/checkpoints/ck1/files/adapter.safetensors", httpx.Response(200, content=b"junk"))
    dest = tmp_path / "a.bin"
    assert cli("jobs", "download", "j1", "ck1", "adapter.safetensors", "-o", str(dest)) == 1
    assert not dest.exists()
    assert capsys.readouterr().err.startswith("error: checksum mismatch for adapter.safetensors")


# --- tokens, quota, registry -----------------------------------------------------------------------------


def test_tokens_create_prints_the_secret_once(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on(
        "POST",
        "/tokens",
        ok({**TOKEN_JSON, "scopes": ["jobs:read", "jobs:write"], "token": "otk_abcd_s3"}, 201),
    )
    assert (
        cli(
            "tokens",
            "create",
            "ci",
            "--scope",
            "jobs:read",
            "--scope",
            "jobs:write",
            "--expires-in-days",
            "7",
        )
        == 0
    )
    assert json.loads(api.last.content) == {
        "name": "ci",
        "scopes": ["jobs:read", "jobs:write"],
        "expires_in_days": 7,
    }
    captured = capsys.readouterr()
    assert captured.out == "otk_abcd_s3\n"  # alone on stdout, for TOKEN=$(opentinker tokens create ...)
    assert "Created token 'ci' (id 5, scopes jobs:read jobs:write, expires never)" in captured.err
    assert "only time the token is shown" in captured.err


def test_tokens_create_json(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("POST", "/tokens", ok({**TOKEN_JSON, "token": "otk_abcd_s3"}, 201))
    assert cli("--json", "tokens", "create", "ci", "--scope", "jobs:read") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["token"] == "otk_abcd_s3"
    assert json.loads(api.last.content)["expires_in_days"] is None
    assert "only time the token is shown" in captured.err


def test_tokens_list_and_revoke(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    revoked = {**TOKEN_JSON, "id": 6, "name": "old", "revoked_at": "2025-03-02T00:00:00Z"}
    api.on("GET", "/tokens", ok(page([TOKEN_JSON, revoked])))
    api.on("DELETE", "/tokens/5", httpx.Response(204))
    assert cli("tokens", "list") == 0
    rows = [cells(line) for line in lines(capsys.readouterr().out)]
    assert rows[0] == ["ID", "NAME", "LOOKUP", "SCOPES", "CREATED (UTC)", "EXPIRES", "LAST USED", "STATUS"]
    assert rows[1] == ["5", "ci", "abcd1234", "jobs:read", "2025-03-01 12:00:00", "-", "-", "active"]
    assert rows[2][-1] == "revoked"
    assert cli("tokens", "revoke", "5") == 0
    assert api.last.method == "DELETE"
    assert capsys.readouterr().out == "Revoked token 5.\n"


def test_quota(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on(
        "GET",
        "/org/quota",
        ok(
            {
                "max_gpus": 8,
                "borrowing_limit_gpus": 4,
                "gpu_hours_per_month": 1000.0,
                "max_queued_jobs": 20,
                "fair_share_weight": 1.5,
                "allowed_pools": ["a100", "cpu"],
                "updated_at": "2025-01-01T00:00:00Z",
            }
        ),
    )
    assert cli("quota") == 0
    out = capsys.readouterr().out
    assert "max GPUs:             8" in out
    assert "GPU hours per month:  1000" in out
    assert "allowed pools:        a100,cpu" in out


def test_envs_list(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {
        "owner": "opentinker",
        "name": "arithmetic",
        "description": "Sums.",
        "visibility": "public",
        "tags": ["math", "toy"],
        "latest_version": "1.0.0",
        "versions": ["1.0.0"],
    }
    api.on("GET", "/envs", ok(page([env])))
    assert cli("envs", "list", "--query", "sum", "--tag", "math") == 0
    assert dict(api.last.url.params) == {"q": "sum", "tag": "math", "limit": "50", "offset": "0"}
    assert [cells(line) for line in lines(capsys.readouterr().out)] == [
        ["ENVIRONMENT", "LATEST", "VISIBILITY", "TAGS", "DESCRIPTION"],
        ["opentinker/arithmetic", "1.0.0", "public", "math,toy", "Sums."],
    ]


def test_models(cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api.on(
        "GET",
        "/models",
        ok({"results": [{"name": "tiny-qwen2", "family": "qwen2", "params": "3M", "description": "Tiny."}]}),
    )
    assert cli("models") == 0
    assert [cells(line) for line in lines(capsys.readouterr().out)] == [
        ["NAME", "FAMILY", "PARAMS", "DESCRIPTION"],
        ["tiny-qwen2", "qwen2", "3M", "Tiny."],
    ]
    assert cli("models", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "tiny-qwen2"


# --- failures and usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, 1), (403, 1), (429, 1), (500, 1), (400, 2)],
)
def test_api_errors_exit_without_a_traceback(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str], status: int, code: int
) -> None:
    api.on("GET", "/org/quota", api_error(status, "x", "Nope."))
    assert cli("quota") == code
    captured = capsys.readouterr()
    assert captured.err == f"error: Nope (HTTP {status})\n"
    assert captured.out == ""


def test_connection_error(
    cli: Run, api: FakeApi, logged_in: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/models", httpx.ConnectError("Connection refused"))
    assert cli("models") == 1
    assert capsys.readouterr().err == f"error: cannot reach {BASE}/api/v1 (Connection refused)\n"
    assert len(api.requests) == 3  # a GET is retried


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["jobs"],
        ["jobs", "show"],
        ["jobs", "list", "--state", "sleeping"],
        ["jobs", "list", "--limit", "0"],
        ["tokens", "create", "ci"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(
    cli: Run, api: FakeApi, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(*argv) == 2
    assert "usage:" in capsys.readouterr().err
    assert api.requests == []


def test_help_exits_0(cli: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--help") == 0
    assert "jobs" in capsys.readouterr().out


def test_python_dash_m(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {"OPENTINKER_CONFIG": str(tmp_path / "none.json"), "PATH": "/usr/bin:/bin"}
    version = subprocess.run(
        [sys.executable, "-m", "opentinker", "--version"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (version.returncode, version.stdout) == (0, "opentinker 0.1.0\n")
    whoami = subprocess.run(
        [sys.executable, "-m", "opentinker", "whoami"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert whoami.returncode == 1
    assert whoami.stderr.startswith("error: not logged in")


def cells(line: str) -> list[str]:
    """A table row split into cells (columns are separated by two or more spaces)."""
    return re.split(r"\s{2,}", line.strip())
