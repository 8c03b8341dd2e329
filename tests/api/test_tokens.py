"""API tokens: creation, use, scopes, expiry, revocation, storage. Actors: alice (owner), bob (member),
charlie (outsider)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from portal.models import ApiToken, Membership, Role
from tests.conftest import client_for

pytestmark = pytest.mark.django_db


def test_created_token_is_shown_once_and_works(alice, acme):
    session = client_for(None)
    session.force_login(alice)
    r = session.post("/api/v1/tokens", {"name": "ci", "scopes": ["jobs:read"]}, format="json")
    assert r.status_code == 201
    secret = r.json()["token"]
    assert secret.startswith("otk_") and len(secret) == 4 + 12 + 1 + 43
    token_id = r.json()["id"]
    assert r.json()["scopes"] == ["jobs:read"]

    listed = session.get("/api/v1/tokens").json()["results"]
    assert [t["id"] for t in listed] == [token_id]
    assert "token" not in listed[0]
    assert "token" not in session.get(f"/api/v1/tokens/{token_id}").json()

    me = client_for(secret).get("/api/v1/me")
    assert me.status_code == 200
    assert me.json()["organization"]["slug"] == "acme"
    assert me.json()["scopes"] == ["jobs:read"]


def _all_text_in_database() -> str:
    """Every row of every table of ours, as text: the secret must appear nowhere."""
    with connection.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = [t for (t,) in cur.fetchall()]
        chunks = []
        for table in tables:
            cur.execute(f"SELECT coalesce(string_agg(t::text, ' '), '') FROM \"{table}\" t")  # noqa: S608
            chunks.append(cur.fetchone()[0])
    return "\n".join(chunks)


def test_database_never_holds_the_secret(alice, acme, make_token):
    secret = make_token(alice, acme)
    secret_part = secret.split("_", 2)[2]
    dump = _all_text_in_database()
    assert secret.split("_")[1] in dump  # the lookup is stored: the dump did read the token table
    assert secret_part not in dump
    row = ApiToken.objects.get(lookup=secret.split("_")[1])
    assert len(row.secret_hash) == 64 and secret_part not in row.secret_hash


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"),  # wrong secret
        lambda s: s.replace("otk_", "otx_"),  # wrong prefix
        lambda s: s[:20],  # truncated
        lambda s: "otk_000000000000_" + s.split("_", 2)[2],  # unknown lookup
        lambda s: s + "x" * 300,  # oversized
        lambda s: "",  # empty
    ],
    ids=["wrong-secret", "wrong-prefix", "truncated", "unknown-lookup", "oversized", "empty"],
)
def test_malformed_or_wrong_tokens_are_refused(alice, acme, make_token, mangle):
    bad = mangle(make_token(alice, acme))
    client = client_for(None)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {bad}")
    r = client.get("/api/v1/jobs")
    assert r.status_code == 401
    assert r.json()["error"]["code"] in ("authentication_failed", "not_authenticated")
    assert r["WWW-Authenticate"] == "Bearer"


def test_revoked_token_is_refused(alice, acme, make_token):
    secret = make_token(alice, acme)
    client = client_for(secret)
    token_id = client.get("/api/v1/tokens").json()["results"][0]["id"]
    assert client.delete(f"/api/v1/tokens/{token_id}").status_code == 204
    assert client.get("/api/v1/jobs").status_code == 401
    assert ApiToken.objects.get(pk=token_id).revoked_at is not None


def test_expired_token_is_refused(alice, acme, make_token):
    secret = make_token(alice, acme, expires_in_days=1)
    assert client_for(secret).get("/api/v1/jobs").status_code == 200
    ApiToken.objects.filter(lookup=secret.split("_")[1]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert client_for(secret).get("/api/v1/jobs").status_code == 401


def test_wrong_scope_is_forbidden(alice, acme, make_token):
    reader = client_for(make_token(alice, acme, scopes=["jobs:read"]))
    assert reader.get("/api/v1/jobs").status_code == 200
    r = reader.post("/api/v1/jobs", {"kind": "rl"}, format="json")
    assert r.status_code == 403
    assert "jobs:write" in r.json()["error"]["message"]
    env_only = client_for(make_token(alice, acme, scopes=["envs:read"]))
    assert env_only.get("/api/v1/jobs").status_code == 403
    assert env_only.get("/api/v1/envs").status_code == 200


def test_last_used_is_recorded(alice, acme, make_token):
    secret = make_token(alice, acme)
    row = ApiToken.objects.get(lookup=secret.split("_")[1])
    assert row.last_used_at is None
    client_for(secret).get("/api/v1/me")
    row.refresh_from_db()
    assert row.last_used_at is not None and timezone.now() - row.last_used_at < timedelta(seconds=10)


def test_role_caps_token_scopes(bob, acme, make_token):
    # bob is a member: he may not mint org:admin; as a viewer, not even jobs:write.
    session = client_for(None)
    session.force_login(bob)
    r = session.post("/api/v1/tokens", {"name": "x", "scopes": ["org:admin"]}, format="json")
    assert r.status_code == 403 and "org:admin" in r.json()["error"]["message"]
    Membership.objects.filter(user=bob).update(role=Role.VIEWER)
    r = session.post("/api/v1/tokens", {"name": "x", "scopes": ["jobs:write"]}, format="json")
    assert r.status_code == 403
    assert (
        session.post("/api/v1/tokens", {"name": "x", "scopes": ["jobs:read"]}, format="json").status_code
        == 201
    )


def test_demotion_narrows_existing_tokens_and_removal_kills_them(alice, bob, acme, make_token):
    secret = make_token(bob, acme, scopes=["jobs:read", "jobs:write"])
    client = client_for(secret)
    assert client.get("/api/v1/me").json()["scopes"] == ["jobs:read", "jobs:write"]
    Membership.objects.filter(user=bob).update(role=Role.VIEWER)
    assert client.get("/api/v1/me").json()["scopes"] == ["jobs:read"]
    assert client.post("/api/v1/jobs", {}, format="json").status_code == 403
    bob_id = Membership.objects.get(user=bob).pk
    as_alice = client_for(make_token(alice, acme))
    assert as_alice.delete(f"/api/v1/org/members/{bob_id}").status_code == 204
    assert client.get("/api/v1/me").status_code == 401


def test_token_minting_through_a_token_needs_org_admin_and_never_widens(alice, acme, make_token):
    limited = client_for(make_token(alice, acme, scopes=["jobs:read", "org:admin"]))
    r = limited.post("/api/v1/tokens", {"name": "wider", "scopes": ["jobs:write"]}, format="json")
    assert r.status_code == 403 and "jobs:write" in r.json()["error"]["message"]
    assert (
        limited.post("/api/v1/tokens", {"name": "same", "scopes": ["jobs:read"]}, format="json").status_code
        == 201
    )
    no_admin = client_for(make_token(alice, acme, scopes=["jobs:read", "jobs:write"]))
    assert (
        no_admin.post("/api/v1/tokens", {"name": "n", "scopes": ["jobs:read"]}, format="json").status_code
        == 403
    )


def test_platform_admin_scope_needs_staff(alice, acme):
    session = client_for(None)
    session.force_login(alice)
    r = session.post("/api/v1/tokens", {"name": "x", "scopes": ["platform:admin"]}, format="json")
    assert r.status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "", "scopes": ["jobs:read"]}, "name"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x", "scopes": ["jobs:delete"]}, "scopes"),
        ({"name": "x", "scopes": ["jobs:read"], "expires_in_days": 0}, "expires_in_days"),
        ({"name": "x", "scopes": ["jobs:read"], "expires_in_days": 10_000}, "expires_in_days"),
        ({"name": "x", "scopes": ["jobs:read"], "owner": "charlie"}, "owner"),
    ],
)
def test_bad_token_requests_name_the_field(as_alice, body, field):
    before = ApiToken.objects.count()
    r = as_alice.post("/api/v1/tokens", body, format="json")
    assert r.status_code == 400
    fields = r.json()["error"]["fields"]
    assert any(k == field or k.startswith(f"{field}.") for k in fields), fields
    assert ApiToken.objects.count() == before


def test_token_visibility_between_the_three_actors(alice, bob, charlie, acme, globex, make_token):
    alice_secret = make_token(alice, acme)
    bob_secret = make_token(bob, acme)
    charlie_secret = make_token(charlie, globex)
    alice_token = ApiToken.objects.get(lookup=alice_secret.split("_")[1])
    bob_token = ApiToken.objects.get(lookup=bob_secret.split("_")[1])
    as_alice, as_bob, as_charlie = (
        client_for(alice_secret),
        client_for(bob_secret),
        client_for(charlie_secret),
    )

    # The owner (admin) sees every token of the organization; a member only their own.
    assert {t["id"] for t in as_alice.get("/api/v1/tokens").json()["results"]} == {
        alice_token.pk,
        bob_token.pk,
    }
    assert {t["id"] for t in as_bob.get("/api/v1/tokens").json()["results"]} == {bob_token.pk}
    assert as_bob.get(f"/api/v1/tokens/{alice_token.pk}").status_code == 404
    assert as_bob.delete(f"/api/v1/tokens/{alice_token.pk}").status_code == 404
    # The outsider sees nothing of acme's tokens and cannot revoke them.
    assert as_charlie.get(f"/api/v1/tokens/{alice_token.pk}").status_code == 404
    assert as_charlie.delete(f"/api/v1/tokens/{bob_token.pk}").status_code == 404
    bob_token.refresh_from_db()
    assert bob_token.revoked_at is None
    # An admin may revoke a teammate's token.
    assert as_alice.delete(f"/api/v1/tokens/{bob_token.pk}").status_code == 204
    assert as_bob.get("/api/v1/me").status_code == 401
