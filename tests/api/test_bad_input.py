"""Bad input to the write endpoints: the exact status and error code, the offending field named by its dotted
path, a message a human can act on, and nothing written.

Endpoints: POST /jobs (alice, owner of acme), POST /tokens (alice), POST /org/invitations (alice),
POST /org/env-secrets (alice) and PATCH /admin/orgs/acme/quota (a staff user's platform:admin token).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from django.conf import settings
from django.forms.models import model_to_dict

from opentinker.spec import example_rl_spec
from portal.models import (
    ApiToken,
    EnvironmentSecret,
    Invitation,
    Job,
    JobEvent,
    Membership,
    Organization,
    Quota,
)
from portal.services.env_secrets import environment_secret_create
from portal.services.orgs import organization_create
from tests.conftest import client_for

pytestmark = pytest.mark.django_db

JSON = "application/json"
ENDPOINTS: dict[str, tuple[str, str]] = {
    "jobs": ("POST", "/api/v1/jobs"),
    "tokens": ("POST", "/api/v1/tokens"),
    "invitations": ("POST", "/api/v1/org/invitations"),
    "env_secrets": ("POST", "/api/v1/org/env-secrets"),
    "quota": ("PATCH", "/api/v1/admin/orgs/acme/quota"),
}
SUCCESS = {"jobs": 201, "tokens": 201, "invitations": 201, "env_secrets": 201, "quota": 200}


def valid_body(endpoint: str) -> dict[str, Any]:
    return {
        "jobs": lambda: example_rl_spec().model_dump(mode="json"),
        "tokens": lambda: {"name": "ci", "scopes": ["jobs:read"]},
        "invitations": lambda: {"email": "newcomer@example.com", "role": "viewer"},
        "env_secrets": lambda: {"name": "openenv", "value": "s3cret"},
        "quota": lambda: {"max_gpus": 4},
    }[endpoint]()


@dataclass(frozen=True)
class Raw:
    """A body sent exactly as written (not JSON-encoded by the test)."""

    text: str | bytes


def with_(endpoint: str, **changes: Any) -> dict[str, Any]:
    """The endpoint's valid body with dotted paths set (`resources__gpus=-1`); the value DELETE removes it."""
    body = copy.deepcopy(valid_body(endpoint))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = body
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return body


DELETE = object()


@dataclass(frozen=True)
class Bad:
    body: Any  # dict/list/str (JSON-encoded) or Raw
    status: int
    code: str
    field: str | None  # dotted path expected in error.fields (None: a whole-body error with no field)
    words: str  # regex the message must match (case-insensitive): it says what is wrong
    content_type: str = JSON


def _generic_cases(endpoint: str) -> list:
    big = settings.API_MAX_BODY_BYTES
    obj = "(object|dictionary|no data)"
    unknown = "(unknown field|not permitted)"
    return [
        pytest.param(
            endpoint, Bad(Raw("{bad"), 400, "parse_error", None, "malformed JSON"), id=f"{endpoint}-malformed"
        ),
        pytest.param(
            endpoint, Bad([valid_body(endpoint)], 400, "invalid", "body", obj), id=f"{endpoint}-array"
        ),
        pytest.param(endpoint, Bad("a string", 400, "invalid", "body", obj), id=f"{endpoint}-string"),
        pytest.param(endpoint, Bad(Raw("null"), 400, "invalid", "body", obj), id=f"{endpoint}-null"),
        pytest.param(endpoint, Bad(Raw("42"), 400, "invalid", "body", obj), id=f"{endpoint}-number"),
        pytest.param(
            endpoint,
            Bad(with_(endpoint, surprise=1), 400, "invalid", "surprise", unknown),
            id=f"{endpoint}-unknown-field",
        ),
        pytest.param(
            endpoint,
            Bad(with_(endpoint, padding="x" * (big + 1)), 413, "payload_too_large", None, "limit"),
            id=f"{endpoint}-oversized",
        ),
        pytest.param(
            endpoint,
            Bad(Raw('{"a": NaN}'), 400, "parse_error", None, "NaN is not valid JSON"),
            id=f"{endpoint}-nan",
        ),
        pytest.param(
            endpoint,
            Bad(Raw('{"a": -Infinity}'), 400, "parse_error", None, "Infinity is not valid JSON"),
            id=f"{endpoint}-infinity",
        ),
        pytest.param(
            endpoint,
            Bad({"a": "x\x00y"}, 400, "parse_error", None, "NUL"),
            id=f"{endpoint}-nul-character",
        ),
        pytest.param(
            endpoint,
            Bad(Raw('{"a": ' + "[" * 5000 + "]" * 5000 + "}"), 400, "parse_error", None, "nested"),
            id=f"{endpoint}-deeply-nested",
        ),
        pytest.param(
            endpoint,
            Bad(Raw("kind=rl"), 415, "unsupported_media_type", None, "media type", "text/plain"),
            id=f"{endpoint}-text-plain",
        ),
        pytest.param(
            endpoint,
            Bad(
                Raw("a=1"),
                415,
                "unsupported_media_type",
                None,
                "media type",
                "application/x-www-form-urlencoded",
            ),
            id=f"{endpoint}-form-encoded",
        ),
        pytest.param(
            endpoint,
            Bad(Raw(b'{"a": "\xff"}'), 400, "parse_error", None, "UTF-8"),
            id=f"{endpoint}-not-utf8",
        ),
    ]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def J(**changes: Any) -> dict[str, Any]:  # a short name keeps the case table readable
    return with_("jobs", **changes)


STORE = settings.OBJECT_STORE_URL
STORAGE_WORDS = "not in your organization's storage"
JOB_CASES = [
    ("empty-body", Raw(""), 400, "invalid", "kind", "required"),
    # types and ranges (pydantic, field paths like resources.gpus)
    ("unknown-nested-field", J(resources__gpu=1), 400, "invalid", "resources.gpu", "not permitted"),
    ("gpus-wrong-type", J(resources__gpus="two"), 400, "invalid", "resources.gpus", "integer"),
    ("gpus-negative", J(resources__gpus=-1), 400, "invalid", "resources.gpus", "greater than or equal to 0"),
    ("gpus-absurd", J(resources__gpus=10**9), 400, "invalid", "resources.gpus", "less than or equal to 1024"),
    ("max-hours-zero", J(resources__max_hours=0), 400, "invalid", "resources.max_hours", "greater than 0"),
    (
        "memory-absurd",
        J(resources__memory_gb=1e12),
        400,
        "invalid",
        "resources.memory_gb",
        "less than or equal",
    ),
    ("cpus-zero", J(resources__cpus=0), 400, "invalid", "resources.cpus", "greater than or equal to 1"),
    (
        "lr-wrong-type",
        J(algorithm__learning_rate="fast"),
        400,
        "invalid",
        "algorithm.learning_rate",
        "number",
    ),
    (
        "lora-rank-zero",
        J(model__lora={"rank": 0}),
        400,
        "invalid",
        "model.lora.rank",
        "greater than or equal",
    ),
    ("resources-not-object", J(resources=[1]), 400, "invalid", "resources", "dictionary|object"),
    ("kind-missing", J(kind=DELETE), 400, "invalid", "kind", "required"),
    ("kind-unknown", J(kind="dpo"), 400, "invalid", "kind", "'rl', 'sft' or 'eval'"),
    ("spec-version-2", J(spec_version=2), 400, "invalid", "spec_version", "1"),
    ("name-bad-chars", J(name="<script>"), 400, "invalid", "name", "letters, digits"),
    # environment secrets: named only for an https:// remote environment, and must exist in the organization
    (
        "env-secret-unknown",
        J(environment={"ref": "https://env.example/x", "secret": "nope"}),
        400,
        "invalid",
        "environment.secret",
        "no environment secret named 'nope'",
    ),
    (
        "env-secret-registry-ref",
        J(environment={"ref": "opentinker/arithmetic@1.0.0", "secret": "taken"}),
        400,
        "invalid",
        "environment.secret",
        "only sent to an https:// remote",
    ),
    (
        "env-secret-plain-http",
        J(environment={"ref": "http://env.example/x", "secret": "taken"}),
        400,
        "invalid",
        "environment.secret",
        "only sent to an https:// remote",
    ),
    ("seed-absurd", J(seed=10**400), 400, "invalid", "seed", "less than or equal"),
    # references: environment, model, dataset
    (
        "env-ref-syntax",
        J(environment={"ref": "not a ref"}),
        400,
        "invalid",
        "environment.ref",
        "owner/name@version",
    ),
    (
        "env-unknown",
        J(environment={"ref": "nobody/nothing@1.0.0"}),
        400,
        "invalid",
        "environment.ref",
        "no environment nobody/nothing",
    ),
    (
        "env-unknown-version",
        J(environment={"ref": "opentinker/arithmetic@9.9.9"}),
        400,
        "invalid",
        "environment.ref",
        "no version 9.9.9",
    ),
    ("rl-without-env", J(environment=None), 400, "invalid", "environment", "needs an environment"),
    ("model-unknown", J(model={"base": "gpt-17"}), 400, "invalid", "model.base", "unknown model 'gpt-17'"),
    (
        "model-outside-store",
        J(model={"base": "s3://other-bucket/x"}),
        400,
        "invalid",
        "model.base",
        STORAGE_WORDS,
    ),
    (
        "dataset-outside-store",
        {"kind": "sft", "model": {"base": "tiny-qwen2"}, "dataset": {"uri": "s3://other-bucket/d.jsonl"}},
        400,
        "invalid",
        "dataset.uri",
        STORAGE_WORDS,
    ),
    (
        "dataset-not-a-uri",
        {"kind": "sft", "model": {"base": "tiny-qwen2"}, "dataset": {"uri": "/etc/passwd"}},
        400,
        "invalid",
        "dataset.uri",
        "must start with",
    ),
    (
        "model-uri-dot-dot-escapes-store",
        J(model={"base": f"{STORE}/orgs/acme/../../../etc"}),
        400,
        "invalid",
        "model.base",
        STORAGE_WORDS,
    ),
    (
        "model-uri-sibling-of-store",
        J(model={"base": f"{STORE}-other/m"}),
        400,
        "invalid",
        "model.base",
        STORAGE_WORDS,
    ),
    (
        "model-uri-of-another-org",
        J(model={"base": f"{STORE}/orgs/globex/jobs/x/step-5"}),
        400,
        "invalid",
        "model.base",
        STORAGE_WORDS,
    ),
    (
        # normalize() drops a query: the path a runtime would read from the raw string is another org's
        "model-uri-query-escapes",
        J(model={"base": f"{STORE}/orgs/acme/x?/../../globex/jobs/y"}),
        400,
        "invalid",
        "model.base",
        STORAGE_WORDS,
    ),
    (
        "resume-from-other-bucket",
        J(resume_from="s3://other-bucket/ckpt"),
        400,
        "invalid",
        "resume_from",
        STORAGE_WORDS,
    ),
    ("resume-from-not-a-uri", J(resume_from="/etc/passwd"), 400, "invalid", "resume_from", "checkpoint URI"),
    (
        "config-nested-too-deep",
        J(environment={"ref": "opentinker/arithmetic@1.0.0", "config": {"x": nested(40)}}),
        400,
        "parse_error",
        None,
        "nested",
    ),
    (
        "sft-without-dataset",
        {"kind": "sft", "model": {"base": "tiny-qwen2"}},
        400,
        "invalid",
        "dataset",
        "dataset",
    ),
    (
        "rl-with-sft-algorithm",
        J(algorithm={"name": "sft"}),
        400,
        "invalid",
        "algorithm",
        "not valid for a rl job",
    ),
    (
        "sft-with-grpo",
        {
            "kind": "sft",
            "model": {"base": "tiny-qwen2"},
            "dataset": {"uri": f"{STORE}/d.jsonl"},
            "algorithm": {"name": "grpo"},
        },
        400,
        "invalid",
        "algorithm",
        "not valid for a sft job",
    ),
    # quota (acme: 1 GPU nominal, 0 borrowed, 100 GPU-hours a month, 8 CPUs a job)
    ("gpus-over-quota", J(resources__gpus=2), 429, "quota_exceeded", "resources.gpus", "2 GPUs.*at most 1"),
    ("cpus-over-quota", J(resources__cpus=9), 429, "quota_exceeded", "resources.cpus", "9 CPUs"),
    (
        "gpu-hours-over-quota",
        J(resources__gpus=1, resources__max_hours=200),
        429,
        "quota_exceeded",
        "resources.max_hours",
        "GPU-hours",
    ),
    (
        "idempotency-key-too-long",
        J(),
        400,
        "invalid",
        "Idempotency-Key",
        "at most 100 characters",
    ),
]

TOKEN_CASES = [
    ("empty-body", Raw(""), 400, "invalid", "name", "required"),
    ("name-missing", with_("tokens", name=DELETE), 400, "invalid", "name", "required"),
    ("name-too-long", with_("tokens", name="n" * 101), 400, "invalid", "name", "no more than 100"),
    ("scopes-not-list", with_("tokens", scopes="jobs:read"), 400, "invalid", "scopes", "list"),
    ("scope-unknown", with_("tokens", scopes=["root:all"]), 400, "invalid", "scopes.0", "not a valid choice"),
    ("scopes-empty", with_("tokens", scopes=[]), 400, "invalid", "scopes", "at least one scope"),
    ("expiry-zero", with_("tokens", expires_in_days=0), 400, "invalid", "expires_in_days", "greater than or"),
    (
        "expiry-absurd",
        with_("tokens", expires_in_days=10**6),
        400,
        "invalid",
        "expires_in_days",
        "less than or",
    ),
    (
        "expiry-wrong-type",
        with_("tokens", expires_in_days="soon"),
        400,
        "invalid",
        "expires_in_days",
        "integer",
    ),
    # alice is not staff: her token cannot mint a platform:admin token
    (
        "scope-wider",
        with_("tokens", scopes=["platform:admin"]),
        403,
        "permission_denied",
        "scopes",
        "more scopes: platform:admin",
    ),
]

INVITATION_CASES = [
    ("empty-body", Raw(""), 400, "invalid", "email", "required"),
    ("email-missing", with_("invitations", email=DELETE), 400, "invalid", "email", "required"),
    ("email-invalid", with_("invitations", email="not-an-email"), 400, "invalid", "email", "valid email"),
    ("email-list", with_("invitations", email=["a@example.com"]), 400, "invalid", "email", "valid email"),
    ("role-unknown", with_("invitations", role="emperor"), 400, "invalid", "role", "not a valid choice"),
    (
        "already-member",
        with_("invitations", email="BOB@example.com"),
        409,
        "conflict",
        "email",
        "already a member",
    ),
]

ENV_SECRET_CASES = [
    ("empty-body", Raw(""), 400, "invalid", "name", "required"),
    ("value-missing", with_("env_secrets", value=DELETE), 400, "invalid", "value", "required"),
    ("value-empty", with_("env_secrets", value=""), 400, "invalid", "value", "blank"),
    ("value-too-long", with_("env_secrets", value="v" * 4097), 400, "invalid", "value", "no more than 4096"),
    # 2049 characters but 4098 bytes: the limit is on bytes (the service checks it)
    ("value-too-many-bytes", with_("env_secrets", value="é" * 2049), 400, "invalid", "value", "4096 bytes"),
    (
        "value-not-string",
        with_("env_secrets", value={"k": "v"}),
        400,
        "invalid",
        "value",
        "not a valid string",
    ),
    (
        "name-uppercase",
        with_("env_secrets", name="OpenEnv"),
        400,
        "invalid",
        "name",
        "1-63 characters of a-z",
    ),
    ("name-leading-dash", with_("env_secrets", name="-x"), 400, "invalid", "name", "starting with a letter"),
    ("name-too-long", with_("env_secrets", name="n" * 64), 400, "invalid", "name", "no more than 63"),
    ("name-taken", with_("env_secrets", name="taken"), 409, "conflict", "name", "already exists"),
]

QUOTA_CASES = [
    (
        "max-gpus-negative",
        with_("quota", max_gpus=-1),
        400,
        "invalid",
        "max_gpus",
        "greater than or equal to 0",
    ),
    (
        "max-gpus-absurd",
        with_("quota", max_gpus=10**9),
        400,
        "invalid",
        "max_gpus",
        "less than or equal to 4096",
    ),
    ("max-gpus-wrong-type", with_("quota", max_gpus="lots"), 400, "invalid", "max_gpus", "valid integer"),
    ("max-gpus-fraction", with_("quota", max_gpus=1.5), 400, "invalid", "max_gpus", "valid integer"),
    ("cpus-zero", with_("quota", max_cpus_per_job=0), 400, "invalid", "max_cpus_per_job", "greater than or"),
    (
        "weight-zero",
        with_("quota", fair_share_weight=0),
        400,
        "invalid",
        "fair_share_weight",
        "greater than or",
    ),
    (
        "weight-nan-string",
        with_("quota", fair_share_weight="nan"),
        400,
        "invalid",
        "fair_share_weight",
        "number",
    ),
    (
        "pool-bad-name",
        with_("quota", allowed_pools=["Bad Pool"]),
        400,
        "invalid",
        "allowed_pools.0",
        "pattern",
    ),
    ("pools-not-list", with_("quota", allowed_pools="gpu"), 400, "invalid", "allowed_pools", "list"),
]


def _specific(endpoint: str, rows: list) -> list:
    return [pytest.param(endpoint, Bad(*row[1:]), id=f"{endpoint}-{row[0]}") for row in rows]


CASES = [
    *(case for endpoint in ENDPOINTS for case in _generic_cases(endpoint)),
    *_specific("jobs", JOB_CASES),
    *_specific("tokens", TOKEN_CASES),
    *_specific("invitations", INVITATION_CASES),
    *_specific("env_secrets", ENV_SECRET_CASES),
    *_specific("quota", QUOTA_CASES),
]


# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def clients(alice, acme, globex, make_user, make_token) -> dict[str, Any]:
    staffer = make_user("staffer", staff=True)
    ops = organization_create(slug="ops", name="Ops", owner=staffer)
    as_alice = client_for(make_token(alice, acme))
    as_staff = client_for(make_token(staffer, ops, scopes=["platform:admin"]))
    out = {"jobs": as_alice, "tokens": as_alice, "invitations": as_alice, "env_secrets": as_alice}
    out["quota"] = as_staff
    environment_secret_create(
        by=Membership.objects.get(user=alice, organization=acme), name="taken", value="v"
    )
    for client in out.values():
        client.raise_request_exception = False  # a crash must show as a 500, not abort the test
    return out


def db_state() -> dict[str, Any]:
    return {
        "jobs": Job.objects.count(),
        "events": JobEvent.objects.count(),
        "tokens": ApiToken.objects.count(),
        "invitations": Invitation.objects.count(),
        "memberships": Membership.objects.count(),
        "organizations": Organization.objects.count(),
        "env_secrets": list(EnvironmentSecret.objects.order_by("pk").values()),
        "quotas": [model_to_dict(q) | {"updated_at": q.updated_at} for q in Quota.objects.order_by("pk")],
    }


def send(client, endpoint: str, body: Any, content_type: str = JSON, **extra):
    method, url = ENDPOINTS[endpoint]
    data = body.text if isinstance(body, Raw) else json.dumps(body)
    return client.generic(method, url, data, content_type=content_type, **extra)


def assert_error(resp, status: int, code: str, field: str | None, words: str) -> dict:
    assert resp.status_code == status, resp.content[:1000]
    body = resp.json()
    error = body["error"]
    assert error["code"] == code, body
    assert set(error) == {"code", "message", "fields"}, body
    if field is None:
        assert error["fields"] == {} or "body" in error["fields"], body
    else:
        assert field in error["fields"], f"{field!r} not in {list(error['fields'])}"
        assert all(isinstance(m, str) and m for m in error["fields"][field]), body
    message = error["message"]
    assert isinstance(message, str) and len(message) > 5, body
    assert re.search(words, message, flags=re.IGNORECASE), f"message {message!r} does not say {words!r}"
    for junk in ("Traceback", "ErrorDetail", "{'", "<class", "object at 0x"):
        assert junk not in message, f"message {message!r} reads like an internal repr"
    return body


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_valid_body_is_accepted(clients, endpoint):
    """Control: each endpoint's valid body succeeds, so the failures below come from the bad part alone."""
    resp = send(clients[endpoint], endpoint, valid_body(endpoint))
    assert resp.status_code == SUCCESS[endpoint], resp.content


@pytest.mark.parametrize(("endpoint", "case"), CASES)
def test_bad_input_is_refused_with_the_field_and_nothing_is_written(clients, endpoint, case: Bad):
    before = db_state()
    extra = {}
    if endpoint == "jobs" and case.field == "Idempotency-Key":
        extra["HTTP_IDEMPOTENCY_KEY"] = "k" * 101
    resp = send(clients[endpoint], endpoint, case.body, case.content_type, **extra)
    assert_error(resp, case.status, case.code, case.field, case.words)
    assert db_state() == before


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_oversized_body_is_refused_and_writes_nothing(clients, endpoint):
    """What holds today despite the 413 bug above: a client error, never a crash, nothing stored."""
    before = db_state()
    body = with_(endpoint, padding="x" * (settings.API_MAX_BODY_BYTES + 1))
    resp = send(clients[endpoint], endpoint, body)
    assert resp.status_code in (400, 413), resp.status_code
    assert db_state() == before


def test_queued_jobs_limit(clients, acme):
    Quota.objects.filter(organization=acme).update(max_queued_jobs=2)
    client = clients["jobs"]
    for _ in range(2):
        assert send(client, "jobs", valid_body("jobs")).status_code == 201
    before = db_state()
    resp = send(client, "jobs", valid_body("jobs"))
    assert_error(resp, 429, "quota_exceeded", None, r"2 jobs waiting \(limit 2\)")
    assert db_state() == before
    assert Job.objects.filter(organization=acme).count() == 2


def test_unknown_org_slug_for_admin_quota_is_404(clients):
    before = db_state()
    resp = clients["quota"].patch("/api/v1/admin/orgs/no-such-org/quota", {"max_gpus": 2}, format="json")
    assert_error(resp, 404, "not_found", None, "not found")
    assert db_state() == before


@pytest.mark.parametrize(
    ("headers", "status", "code", "words"),
    [
        pytest.param({"CONTENT_LENGTH": str(10**9)}, 413, "payload_too_large", "limit", id="declared-huge"),
        pytest.param(
            {"CONTENT_LENGTH": "lots"}, 400, "parse_error", "Content-Length", id="length-not-a-number"
        ),
        pytest.param(
            {"CONTENT_LENGTH": "", "HTTP_TRANSFER_ENCODING": "chunked"},
            411,
            "length_required",
            "Content-Length",
            id="chunked-without-length",
        ),
    ],
)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_body_length_headers(clients, endpoint, headers, status, code, words):
    before = db_state()
    resp = send(clients[endpoint], endpoint, valid_body(endpoint), **headers)
    assert_error(resp, status, code, None, words)
    assert db_state() == before


@pytest.mark.parametrize(
    ("who", "method", "url"),
    [
        pytest.param("alice", "GET", "/api/v1/envs/acme/a%00b", id="env-name"),
        pytest.param("alice", "GET", "/api/v1/envs/a%00b/arithmetic", id="env-owner"),
        pytest.param("staff", "GET", "/api/v1/admin/orgs/a%00b/quota", id="admin-slug-get"),
        pytest.param("staff", "PATCH", "/api/v1/admin/orgs/a%00b/quota", id="admin-slug-patch"),
    ],
)
def test_nul_in_a_path_parameter_is_404(clients, who, method, url):
    client = clients["jobs" if who == "alice" else "quota"]
    before = db_state()
    resp = client.generic(method, url, json.dumps({"max_gpus": 2}), content_type=JSON)
    assert_error(resp, 404, "not_found", None, "not found|no environment")
    assert db_state() == before
