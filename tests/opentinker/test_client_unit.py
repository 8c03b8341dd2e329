"""Unit tests of the SDK client against httpx.MockTransport: exact requests out, typed results in."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from opentinker import errors
from opentinker.client import USER_AGENT, Client, load_spec
from opentinker.spec import JobKind, JobState, example_rl_spec
from opentinker.types import CreatedToken, Job, MetricSeries

BASE = "https://api.test"
TOKEN = "otk_abcd1234_s3cr3t"

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class FakeApi:
    """A MockTransport handler: canned replies per (method, path), every request recorded.

    Replies for a route are used in order; the last one repeats.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, *replies: Reply) -> FakeApi:
        self.routes[(method, "/api/v1" + path)] = list(replies)
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        # Match the path as sent (percent-encoded), so tests see exactly what the server would.
        path = request.url.raw_path.decode().split("?")[0]
        queue = self.routes.get((request.method, path))
        if not queue:
            return httpx.Response(
                418, json={"error": {"code": "unrouted", "message": f"no route {request.url}"}}
            )
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, Exception):
            raise reply
        return reply(request) if callable(reply) else reply

    def client(self, base_url: str = BASE, **kwargs: Any) -> Client:
        return Client(base_url, TOKEN, transport=httpx.MockTransport(self), backoff=0, **kwargs)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def ok(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def api_error(
    status: int, code: str, message: str, fields: dict[str, list[str]] | None = None
) -> httpx.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        err["fields"] = fields
    return httpx.Response(status, json={"error": err})


def job_json(**overrides: Any) -> dict[str, Any]:
    job = {
        "id": "7f1c0a52-3d2b-4c59-9a7e-1f2d3c4b5a69",
        "name": "arithmetic-grpo",
        "kind": "rl",
        "state": "queued",
        "state_reason": "",
        "spec": example_rl_spec().model_dump(mode="json"),
        "organization": "acme",
        "created_by": "alice",
        "priority": 0,
        "gpus": 0,
        "pool": None,
        "attempt": 0,
        "created_at": "2025-03-01T12:00:00Z",
        "updated_at": "2025-03-01T12:00:00Z",
        "started_at": None,
        "finished_at": None,
    }
    return {**job, **overrides}


def page(results: list[Any], count: int | None = None, next_url: str | None = None) -> dict[str, Any]:
    return {
        "count": len(results) if count is None else count,
        "next": next_url,
        "previous": None,
        "results": results,
    }


ME = {
    "username": "alice",
    "email": "alice@example.com",
    "is_staff": False,
    "organization": {"slug": "acme", "name": "Acme Corp"},
    "role": "admin",
    "scopes": ["jobs:read", "jobs:write"],
}

TOKEN_JSON = {
    "id": 5,
    "name": "ci",
    "lookup": "abcd1234",
    "scopes": ["jobs:read"],
    "user": "alice",
    "created_at": "2025-03-01T12:00:00Z",
    "expires_at": None,
    "last_used_at": None,
    "revoked_at": None,
}

CHECKPOINT_BYTES = b"weights" * 1000
CHECKPOINTS = {
    "results": [
        {
            "id": "ck1",
            "step": 5,
            "uri": "s3://bucket/acme/job/ck1",
            "created_at": "2025-03-01T12:05:00Z",
            "size_bytes": len(CHECKPOINT_BYTES),
            "files": [
                {
                    "name": "adapter.safetensors",
                    "size": len(CHECKPOINT_BYTES),
                    "sha256": hashlib.sha256(CHECKPOINT_BYTES).hexdigest(),
                    "download_url": f"{BASE}/api/v1/jobs/j1/checkpoints/ck1/files/adapter.safetensors",
                }
            ],
        }
    ]
}


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


# --- transport basics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_url", [BASE, BASE + "/", BASE + "/api/v1", BASE + "/api/v1/"])
def test_sends_auth_and_user_agent_to_the_api_prefix(api: FakeApi, base_url: str) -> None:
    api.on("GET", "/me", ok(ME))
    with api.client(base_url) as client:
        me = client.me()
    req = api.last
    assert str(req.url) == f"{BASE}/api/v1/me"
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["user-agent"] == USER_AGENT == "opentinker-sdk/0.1.0"
    assert me.username == "alice" and me.organization is not None and me.organization.slug == "acme"
    assert me.scopes == ["jobs:read", "jobs:write"]


def test_rejects_a_non_http_url_and_hides_the_token_in_repr(api: FakeApi) -> None:
    with pytest.raises(errors.ValidationError, match="http:// or https://"):
        api.client("api.test")
    client = api.client()
    assert TOKEN not in repr(client)
    client.close()


def test_context_manager_closes_the_http_client(api: FakeApi) -> None:
    with api.client() as client:
        pass
    assert client._http.is_closed


# --- jobs ------------------------------------------------------------------------------------------------


def test_submit_posts_the_spec_json_and_parses_the_job(api: FakeApi) -> None:
    spec = example_rl_spec()
    api.on("POST", "/jobs", ok(job_json(), 201))
    with api.client() as client:
        job = client.jobs.submit(spec)
    req = api.last
    assert req.method == "POST" and req.url.path == "/api/v1/jobs"
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.content) == spec.model_dump(mode="json")
    assert isinstance(job, Job)
    assert job.state is JobState.QUEUED and job.kind is JobKind.RL and not job.is_terminal
    assert isinstance(job.created_at, datetime) and job.created_at.tzinfo is not None
    assert job.spec["model"]["base"] == "tiny-qwen2"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_submit_reads_spec_files(api: FakeApi, tmp_path: Path, suffix: str) -> None:
    data = example_rl_spec().model_dump(mode="json")
    path = tmp_path / f"job{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(
            "kind: rl\nname: from-yaml\nmodel: {base: tiny-qwen2}\n"
            "environment: {ref: opentinker/arithmetic@1.0.0}\n"
        )
    api.on("POST", "/jobs", ok(job_json(), 201))
    with api.client() as client:
        client.jobs.submit(str(path))
    body = json.loads(api.last.content)
    assert body["environment"]["ref"] == "opentinker/arithmetic@1.0.0"
    assert body["name"] == ("from-yaml" if suffix == ".yaml" else "arithmetic-grpo")
    assert body["algorithm"]["name"] == "grpo"  # defaults filled in locally


def test_invalid_spec_is_rejected_locally_with_field_paths(api: FakeApi) -> None:
    bad = {"kind": "rl", "model": {"base": "tiny-qwen2"}, "algorithm": {"steps": 0}, "typo": 1}
    with api.client() as client, pytest.raises(errors.ValidationError) as info:
        client.jobs.submit(bad)
    assert api.requests == []
    exc = info.value
    assert exc.status is None
    assert set(exc.fields) >= {"algorithm.steps", "environment", "typo"}
    text = str(exc)
    assert "\n" not in text
    assert text.startswith("invalid job spec: ")
    assert "algorithm.steps: Input should be greater than or equal to 1" in text
    assert "environment: a rl job needs an environment" in text


def test_spec_file_errors(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(errors.ValidationError, match="must contain a mapping"):
        load_spec(tmp_path / "list.yaml")
    with pytest.raises(errors.ValidationError, match="not valid json"):
        load_spec(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "missing.yaml")


def test_submit_without_validation_sends_a_dict_as_is(api: FakeApi) -> None:
    raw = {"kind": "rl", "model": {"base": "tiny-qwen2"}, "field_from_the_future": True}
    api.on("POST", "/jobs", ok(job_json(), 201))
    with api.client() as client:
        client.jobs.submit(raw, validate=False)
    assert json.loads(api.last.content) == raw


def test_list_sends_filters_and_parses_a_page(api: FakeApi) -> None:
    api.on(
        "GET", "/jobs", ok(page([job_json(state="running")], count=31, next_url=f"{BASE}/api/v1/jobs?o=30"))
    )
    with api.client() as client:
        result = client.jobs.list(state=JobState.RUNNING, kind="rl", limit=10, offset=20)
    assert dict(api.last.url.params) == {"state": "running", "kind": "rl", "limit": "10", "offset": "20"}
    assert result.count == 31 and result.next is not None
    assert [j.state for j in result.results] == [JobState.RUNNING]


def test_iter_pages_through_everything_by_offset(api: FakeApi) -> None:
    jobs = [job_json(id=f"j{i}") for i in range(5)]
    api.on(
        "GET",
        "/jobs",
        ok(page(jobs[:2], 5, "http://internal:8000/api/v1/jobs?offset=2")),
        ok(page(jobs[2:4], 5, "http://internal:8000/api/v1/jobs?offset=4")),
        ok(page(jobs[4:], 5, None)),
    )
    with api.client() as client:
        ids = [j.id for j in client.jobs.iter(state="queued", page_size=2)]
    assert ids == ["j0", "j1", "j2", "j3", "j4"]
    assert [r.url.params["offset"] for r in api.requests] == ["0", "2", "4"]
    assert all(r.url.host == "api.test" and r.url.params["state"] == "queued" for r in api.requests)


def test_get_quotes_the_id_and_keeps_unknown_fields_and_states(api: FakeApi) -> None:
    api.on("GET", "/jobs/a%2Fb", ok(job_json(id="a/b", state="hibernating", new_field=1)))
    with api.client() as client:
        job = client.jobs.get("a/b")
    assert api.last.url.raw_path == b"/api/v1/jobs/a%2Fb"
    assert job.state == "hibernating" and not job.is_terminal


def test_cancel_posts_the_reason(api: FakeApi) -> None:
    api.on("POST", "/jobs/j1/cancel", ok(job_json(id="j1", state="cancelling")))
    with api.client() as client:
        job = client.jobs.cancel("j1", reason="wrong lr")
    assert json.loads(api.last.content) == {"reason": "wrong lr"}
    assert job.state is JobState.CANCELLING


def test_metrics_repeats_name_and_parses_series(api: FakeApi) -> None:
    body = {
        "series": [
            {"name": "reward", "steps": [1, 2, 3], "values": [0.1, None, 0.5], "downsampled": False},
            {"name": "loss", "steps": [1], "values": [2.0], "downsampled": True},
        ]
    }
    api.on("GET", "/jobs/j1/metrics", ok(body))
    with api.client() as client:
        series = client.jobs.metrics("j1", names=["reward", "loss"], step_min=1, max_points=500)
    assert api.last.url.params.multi_items() == [
        ("name", "reward"),
        ("name", "loss"),
        ("step_min", "1"),
        ("max_points", "500"),
    ]
    assert all(isinstance(s, MetricSeries) for s in series)
    assert series[0].points() == [(1, 0.1), (2, None), (3, 0.5)]
    assert series[1].downsampled


def test_events_and_iter_events(api: FakeApi) -> None:
    def event(seq: int) -> dict[str, Any]:
        return {
            "seq": seq,
            "kind": "state",
            "created_at": "2025-03-01T12:00:00Z",
            "actor": "scheduler",
            "from_state": "queued",
            "to_state": "admitted",
            "message": "",
            "data": {},
        }

    api.on(
        "GET",
        "/jobs/j1/events",
        ok({"results": [event(1), event(2)], "next_after": 2}),
        ok({"results": [event(3)], "next_after": None}),
    )
    with api.client() as client:
        first = client.jobs.events("j1", after=0, limit=2)
        rest = list(client.jobs.iter_events("j1", after=2, page_size=2))
    assert dict(api.requests[0].url.params) == {"after": "0", "limit": "2"}
    assert first.next_after == 2 and [e.seq for e in first.results] == [1, 2]
    assert [e.seq for e in rest] == [3]
    assert dict(api.requests[1].url.params) == {"after": "2", "limit": "2"}


def test_wait_polls_until_terminal_and_reports_each_event_once(api: FakeApi) -> None:
    def events(seqs: list[int]) -> httpx.Response:
        return ok(
            {
                "results": [{"seq": s, "kind": "state", "to_state": "x"} for s in seqs],
                "next_after": seqs[-1] if seqs else None,
            }
        )

    # Poll 1: event 1, running. Poll 2: event 2, succeeded, then a final drain finds event 3.
    api.on("GET", "/jobs/j1/events", events([1]), events([2]), events([3]))
    api.on(
        "GET", "/jobs/j1", ok(job_json(id="j1", state="running")), ok(job_json(id="j1", state="succeeded"))
    )
    seen: list[int] = []
    sleeps: list[float] = []
    with api.client() as client:
        client._sleep = sleeps.append
        job = client.jobs.wait("j1", poll_interval=0.25, on_event=lambda e: seen.append(e.seq))
    assert job.state is JobState.SUCCEEDED and job.is_terminal
    assert seen == [1, 2, 3]
    assert sleeps == [0.25]
    afters = [r.url.params.get("after") for r in api.requests if r.url.path.endswith("/events")]
    assert afters == [None, "1", "2"]


def test_checkpoints_parse(api: FakeApi) -> None:
    api.on("GET", "/jobs/j1/checkpoints", ok(CHECKPOINTS))
    with api.client() as client:
        (ck,) = client.jobs.checkpoints("j1")
    assert ck.id == "ck1" and ck.step == 5 and ck.size_bytes == len(CHECKPOINT_BYTES)
    f = ck.file("adapter.safetensors")
    assert f is not None and f.sha256 == hashlib.sha256(CHECKPOINT_BYTES).hexdigest()


# --- downloads -------------------------------------------------------------------------------------------


def test_download_follows_a_redirect_without_leaking_the_token(api: FakeApi, tmp_path: Path) -> None:
    presigned = "https://storage.test/bucket/ck1/adapter.safetensors?X-Amz-Signature=abc"
    api.on(
        "GET",
        "/jobs/j1/checkpoints/ck1/files/adapter.safetensors",
        httpx.Response(302, headers={"location": presigned}),
    )
    storage_requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.test":
            storage_requests.append(request)
            return httpx.Response(200, content=CHECKPOINT_BYTES)
        return api(request)

    dest = tmp_path / "out" / "adapter.safetensors"
    with Client(BASE, TOKEN, transport=httpx.MockTransport(handler)) as client:
        path = client.jobs.download(
            "j1", "ck1", "adapter.safetensors", dest, sha256=hashlib.sha256(CHECKPOINT_BYTES).hexdigest()
        )
    assert path == dest and dest.read_bytes() == CHECKPOINT_BYTES
    assert api.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in storage_requests[0].headers
    assert sorted(p.name for p in dest.parent.iterdir()) == ["adapter.safetensors"]  # no temp file left


def test_download_checksum_mismatch_leaves_nothing(api: FakeApi, tmp_path: Path) -> None:
    api.on("GET", "/jobs/j1/checkpoints/ck1/files/a.bin", httpx.Response(200, content=b"corrupt"))
    dest = tmp_path / "a.bin"
    with api.client() as client, pytest.raises(errors.OpenTinkerError, match="checksum mismatch"):
        client.jobs.download("j1", "ck1", "a.bin", dest, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_download_error_keeps_an_existing_file(api: FakeApi, tmp_path: Path) -> None:
    api.on("GET", "/jobs/j1/checkpoints/ck1/files/a.bin", api_error(404, "not_found", "No such file."))
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old")
    with api.client() as client, pytest.raises(errors.NotFound, match="No such file"):
        client.jobs.download("j1", "ck1", "a.bin", dest)
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]


def test_download_retries_a_503(api: FakeApi, tmp_path: Path) -> None:
    api.on(
        "GET",
        "/jobs/j1/checkpoints/ck1/files/dir/a.bin",
        api_error(503, "unavailable", "busy"),
        httpx.Response(200, content=b"data"),
    )
    with api.client() as client:
        client.jobs.download("j1", "ck1", "dir/a.bin", tmp_path / "a.bin")
    assert len(api.requests) == 2 and (tmp_path / "a.bin").read_bytes() == b"data"


# --- tokens, org, registry -------------------------------------------------------------------------------


def test_tokens_create_list_get_revoke(api: FakeApi) -> None:
    api.on("POST", "/tokens", ok({**TOKEN_JSON, "token": "otk_abcd1234_newsecret"}, 201))
    api.on("GET", "/tokens", ok(page([TOKEN_JSON])))
    api.on("GET", "/tokens/5", ok({**TOKEN_JSON, "revoked_at": "2025-03-02T00:00:00Z"}))
    api.on("DELETE", "/tokens/5", httpx.Response(204))
    with api.client() as client:
        created = client.tokens.create("ci", ["jobs:read"], expires_in_days=30)
        assert json.loads(api.last.content) == {"name": "ci", "scopes": ["jobs:read"], "expires_in_days": 30}
        tokens = client.tokens.list()
        token = client.tokens.get("5")
        assert client.tokens.revoke("5") is None
    assert isinstance(created, CreatedToken) and created.token == "otk_abcd1234_newsecret"
    assert created.id == "5"  # integer ids come back as strings
    assert "newsecret" not in repr(created)
    assert tokens.results[0].lookup == "abcd1234" and not hasattr(tokens.results[0], "token")
    assert token.is_revoked
    assert api.last.method == "DELETE" and api.last.url.path == "/api/v1/tokens/5"


def test_create_token_without_expiry_sends_null(api: FakeApi) -> None:
    api.on("POST", "/tokens", ok({**TOKEN_JSON, "token": "otk_x_y"}, 201))
    with api.client() as client:
        client.tokens.create("ci", ["jobs:read", "jobs:write"])
    assert json.loads(api.last.content) == {
        "name": "ci",
        "scopes": ["jobs:read", "jobs:write"],
        "expires_in_days": None,
    }


def test_org_quota_members_models(api: FakeApi) -> None:
    api.on(
        "GET",
        "/org",
        ok({"slug": "acme", "name": "Acme", "role": "admin", "created_at": "2025-01-01T00:00:00Z"}),
    )
    api.on(
        "GET",
        "/org/quota",
        ok(
            {
                "max_gpus": 8,
                "borrowing_limit_gpus": 4,
                "gpu_hours_per_month": 1000,
                "max_queued_jobs": 20,
                "fair_share_weight": 1.5,
                "allowed_pools": ["a100"],
                "updated_at": "2025-01-01T00:00:00Z",
            }
        ),
    )
    api.on(
        "GET",
        "/org/members",
        ok(
            page(
                [
                    {
                        "id": 1,
                        "username": "alice",
                        "email": "a@x",
                        "role": "admin",
                        "joined_at": "2025-01-01T00:00:00Z",
                    }
                ]
            )
        ),
    )
    api.on(
        "GET",
        "/models",
        ok({"results": [{"name": "tiny-qwen2", "family": "qwen2", "params": "3M", "description": "tiny"}]}),
    )
    with api.client() as client:
        assert client.org().slug == "acme"
        quota = client.quota()
        members = client.members(limit=10)
        models = client.models()
    assert quota.max_gpus == 8 and quota.fair_share_weight == 1.5 and quota.allowed_pools == ["a100"]
    assert members.results[0].id == "1" and members.results[0].username == "alice"
    assert dict(api.requests[2].url.params) == {"limit": "10", "offset": "0"}
    assert [m.name for m in models] == ["tiny-qwen2"]


def test_envs_list_and_get(api: FakeApi) -> None:
    env = {
        "owner": "opentinker",
        "name": "arithmetic",
        "description": "sums",
        "visibility": "public",
        "tags": ["math"],
        "latest_version": "1.0.0",
        "versions": ["1.0.0"],
    }
    api.on("GET", "/envs", ok(page([env])))
    api.on("GET", "/envs/opentinker/arithmetic", ok(env))
    with api.client() as client:
        envs = client.envs.list(q="sum", tag="math")
        assert dict(api.last.url.params) == {"q": "sum", "tag": "math", "limit": "50", "offset": "0"}
        one = client.envs.get("opentinker", "arithmetic")
    assert envs.results[0].ref == "opentinker/arithmetic@1.0.0"
    assert one.tags == ["math"]


# --- errors and retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc_class"),
    [
        (400, errors.ValidationError),
        (401, errors.AuthenticationError),
        (403, errors.PermissionDenied),
        (404, errors.NotFound),
        (405, errors.OpenTinkerError),
        (409, errors.Conflict),
        (413, errors.PayloadTooLarge),
        (415, errors.OpenTinkerError),
        (429, errors.QuotaExceeded),
        (500, errors.ServerError),
    ],
)
def test_error_statuses_map_to_exceptions(api: FakeApi, status: int, exc_class: type[Exception]) -> None:
    api.on("POST", "/jobs/j1/cancel", api_error(status, "some_code", "Something went wrong."))
    with api.client() as client, pytest.raises(exc_class) as info:
        client.jobs.cancel("j1")
    exc = info.value
    assert type(exc) is exc_class
    assert isinstance(exc, errors.OpenTinkerError)
    assert (exc.status, exc.code, exc.message) == (status, "some_code", "Something went wrong.")
    assert str(exc) == f"Something went wrong (HTTP {status})"


def test_validation_error_fields_are_in_the_message(api: FakeApi) -> None:
    api.on(
        "POST",
        "/jobs",
        api_error(
            400,
            "invalid",
            "Invalid job spec.",
            {
                "resources.gpus": ["Exceeds your quota of 8 GPUs."],
                "environment.ref": ["Unknown environment.", "Check the version."],
            },
        ),
    )
    with api.client() as client, pytest.raises(errors.ValidationError) as info:
        client.jobs.submit(example_rl_spec())
    assert info.value.fields == {
        "resources.gpus": ["Exceeds your quota of 8 GPUs."],
        "environment.ref": ["Unknown environment.", "Check the version."],
    }
    assert str(info.value) == (
        "Invalid job spec: resources.gpus: Exceeds your quota of 8 GPUs; "
        "environment.ref: Unknown environment, Check the version (HTTP 400)"
    )


def test_quota_exceeded_is_not_retried(api: FakeApi) -> None:
    api.on("POST", "/jobs", api_error(429, "quota_exceeded", "Too many queued jobs (20)."))
    with api.client() as client, pytest.raises(errors.QuotaExceeded, match="Too many queued jobs"):
        client.jobs.submit(example_rl_spec())
    assert len(api.requests) == 1


def test_get_is_retried_on_503_with_backoff(api: FakeApi) -> None:
    api.on("GET", "/me", api_error(503, "unavailable", "busy"), httpx.Response(502), ok(ME))
    sleeps: list[float] = []
    with Client(BASE, TOKEN, transport=httpx.MockTransport(api), backoff=0.5) as client:
        client._sleep = sleeps.append
        assert client.me().username == "alice"
    assert len(api.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_get_gives_up_after_the_retries(api: FakeApi) -> None:
    api.on("GET", "/me", httpx.Response(504, text="<html>Gateway Timeout</html>"))
    with api.client() as client, pytest.raises(errors.ServerError) as info:
        client.me()
    assert len(api.requests) == 3
    assert str(info.value) == "Gateway Timeout (HTTP 504)"


def test_get_is_retried_on_connection_errors(api: FakeApi) -> None:
    api.on("GET", "/me", httpx.ConnectError("refused"), ok(ME))
    with api.client() as client:
        assert client.me().username == "alice"
    assert len(api.requests) == 2


def test_connection_error_after_retries(api: FakeApi) -> None:
    api.on("GET", "/me", httpx.ConnectError("connection refused"))
    with api.client() as client, pytest.raises(errors.ApiConnectionError, match="connection refused"):
        client.me()
    assert len(api.requests) == 3


def test_post_without_idempotency_key_is_never_retried(api: FakeApi) -> None:
    api.on("POST", "/jobs/j1/cancel", api_error(503, "unavailable", "busy"), ok(job_json(), 200))
    with api.client() as client, pytest.raises(errors.ServerError):
        client.jobs.cancel("j1")
    assert len(api.requests) == 1


def test_post_timeout_is_not_retried_and_says_it_may_have_applied(api: FakeApi) -> None:
    api.on("POST", "/jobs/j1/cancel", httpx.ReadTimeout("timed out"))
    with (
        api.client() as client,
        pytest.raises(errors.ApiConnectionError, match="may or may not have been applied"),
    ):
        client.jobs.cancel("j1")
    assert len(api.requests) == 1


def test_submit_is_retried_with_one_idempotency_key(api: FakeApi) -> None:
    api.on(
        "POST",
        "/jobs",
        httpx.ReadTimeout("timed out"),
        api_error(503, "unavailable", "busy"),
        ok(job_json(), 201),
    )
    with api.client() as client:
        job = client.jobs.submit(example_rl_spec())
    assert job.id == job_json()["id"]
    keys = {r.headers["Idempotency-Key"] for r in api.requests}
    assert len(api.requests) == 3 and len(keys) == 1


def test_submit_uses_the_given_idempotency_key(api: FakeApi) -> None:
    api.on("POST", "/jobs", ok(job_json(), 200))
    with api.client() as client:
        client.jobs.submit(example_rl_spec(), idempotency_key="nightly-2026-11-25")
    assert api.requests[0].headers["Idempotency-Key"] == "nightly-2026-11-25"


def test_non_json_success_is_a_clear_error(api: FakeApi) -> None:
    api.on(
        "GET",
        "/me",
        httpx.Response(200, text="<html>login page</html>", headers={"content-type": "text/html"}),
    )
    with api.client() as client, pytest.raises(errors.OpenTinkerError, match="did not answer with JSON"):
        client.me()


def test_malformed_response_is_a_clear_error(api: FakeApi) -> None:
    api.on("GET", "/jobs/j1", ok({"id": "j1"}))
    with api.client() as client, pytest.raises(errors.OpenTinkerError) as info:
        client.jobs.get("j1")
    assert info.value.code == "bad_response" and "kind" in info.value.fields


def test_redirected_post_is_refused(api: FakeApi) -> None:
    api.on("POST", "/jobs", httpx.Response(301, headers={"location": "https://elsewhere.test/api/v1/jobs"}))
    with api.client() as client, pytest.raises(errors.OpenTinkerError, match="unexpected redirect"):
        client.jobs.submit(example_rl_spec())
    assert len(api.requests) == 1


# --- configuration ---------------------------------------------------------------------------------------


def test_from_env_prefers_env_vars_over_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"url": "https://saved.test", "token": "otk_saved_x"}))
    monkeypatch.setenv("OPENTINKER_CONFIG", str(cfg))
    monkeypatch.delenv("OPENTINKER_TOKEN", raising=False)
    monkeypatch.setenv("OPENTINKER_URL", "https://env.test")
    with Client.from_env() as client:
        assert client.base_url == "https://env.test/api/v1"
        assert client._http.headers["authorization"] == "Bearer otk_saved_x"
    monkeypatch.delenv("OPENTINKER_URL")
    monkeypatch.setenv("OPENTINKER_TOKEN", "otk_env_y")
    with Client.from_env() as client:
        assert client.base_url == "https://saved.test/api/v1"
        assert client._http.headers["authorization"] == "Bearer otk_env_y"


def test_from_env_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENTINKER_CONFIG", str(tmp_path / "missing.json"))
    monkeypatch.delenv("OPENTINKER_URL", raising=False)
    monkeypatch.delenv("OPENTINKER_TOKEN", raising=False)
    with pytest.raises(errors.OpenTinkerError, match="not logged in"):
        Client.from_env()


def test_sdk_imports_neither_django_nor_torch() -> None:
    # Block the heavy packages outright, so the check holds whether or not they are installed.
    code = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("django", "torch"):
            raise ImportError("blocked " + name)

sys.meta_path.insert(0, Block())
import opentinker.client, opentinker.cli, opentinker.types, opentinker.errors
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("django", "torch"))
assert not heavy, heavy
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
