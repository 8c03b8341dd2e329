"""The audit log: one entry per security-relevant action (who, which organization, what, when, from where),
read by the organization's admins, by platform staff for every organization, and downloadable.

Actors: alice (owner of acme), bob (member of acme), charlie (owner of globex, the outsider), a staffer."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from env_registry.models import EnvironmentPackage
from opentinker.spec import JobState, example_rl_spec
from portal.actors import Actor
from portal.models import ApiToken, AuditEntry, Membership
from portal.services.jobs import job_set_priority, job_submit, job_transition
from portal.services.orgs import organization_create
from tests.conftest import client_for

pytestmark = pytest.mark.django_db
V1 = "/api/v1"
UA = "audit-test/1.0"


@pytest.fixture
def staffer(make_user):
    return make_user("staffer", staff=True)


@pytest.fixture
def as_staff(staffer, make_token):
    ops = organization_create(slug="ops", name="Ops", owner=staffer)
    return client_for(make_token(staffer, ops, scopes=["platform:admin"]))


@pytest.fixture
def alice_client(alice, acme, make_token):
    """alice through a token, saying who she is in User-Agent: entries name the token and the agent."""
    secret = make_token(alice, acme)
    client = client_for(secret)
    client.defaults["HTTP_USER_AGENT"] = UA
    client.token = ApiToken.objects.get(lookup=secret.split("_")[1])
    return client


def only(action: str) -> AuditEntry:
    # The actors' own tokens (conftest's make_token, "<user>-test") are entries too: not this test's.
    entries = list(AuditEntry.objects.filter(action=action).exclude(target_label__regex=r"^[a-z]+-test \("))
    assert len(entries) == 1, [str(e) for e in entries]
    return entries[0]


def fields(entry: AuditEntry) -> dict:
    return {
        "organization": entry.organization.slug if entry.organization else None,
        "actor_user": entry.actor_user.username if entry.actor_user else None,
        "actor_token": entry.actor_token_id,
        "actor_label": entry.actor_label,
        "target_type": entry.target_type,
        "target_id": entry.target_id,
        "target_label": entry.target_label,
        "ip": entry.ip,
        "user_agent": entry.user_agent,
        "details": entry.details,
    }


def by_alice(client, **rest) -> dict:
    t = client.token
    return {
        "organization": "acme",
        "actor_user": "alice",
        "actor_token": t.pk,
        "actor_label": f"alice (token {t.name}, otk_{t.lookup}_…)",
        "ip": "127.0.0.1",
        "user_agent": UA,
        **rest,
    }


def test_token_created_and_revoked(alice_client):
    r = alice_client.post(f"{V1}/tokens", {"name": "ci", "scopes": ["jobs:read"]}, format="json")
    assert r.status_code == 201
    token = ApiToken.objects.get(pk=r.json()["id"])
    created = only("token.created")
    assert fields(created) == by_alice(
        alice_client,
        target_type="apitoken",
        target_id=str(token.pk),
        target_label=f"ci (otk_{token.lookup}_…)",
        details={"scopes": ["jobs:read"], "expires_at": None, "owner": "alice"},
    )
    assert timezone.now() - created.created_at < timedelta(minutes=5)
    assert alice_client.delete(f"{V1}/tokens/{token.pk}").status_code == 204
    assert fields(only("token.revoked")) == by_alice(
        alice_client,
        target_type="apitoken",
        target_id=str(token.pk),
        target_label=f"ci (otk_{token.lookup}_…)",
        details={"owner": "alice"},
    )
    # Revoking twice changes nothing and records nothing more.
    assert alice_client.delete(f"{V1}/tokens/{token.pk}").status_code in (204, 404)
    assert AuditEntry.objects.filter(action="token.revoked").count() == 1


def test_member_role_changed_and_removed(alice_client, bob, acme):
    member = Membership.objects.get(user=bob, organization=acme)
    assert (
        alice_client.patch(f"{V1}/org/members/{member.pk}", {"role": "viewer"}, format="json").status_code
        == 200
    )
    assert fields(only("member.role_changed")) == by_alice(
        alice_client,
        target_type="membership",
        target_id=str(member.pk),
        target_label="bob",
        details={"username": "bob", "from": "member", "to": "viewer"},
    )
    assert alice_client.delete(f"{V1}/org/members/{member.pk}").status_code == 204
    assert fields(only("member.removed")) == by_alice(
        alice_client,
        target_type="membership",
        target_id=str(member.pk),
        target_label="bob",
        details={"username": "bob", "role": "viewer", "left": False, "tokens_revoked": 0},
    )


def test_invitations_created_revoked_and_accepted(alice_client, make_user):
    r = alice_client.post(
        f"{V1}/org/invitations", {"email": "Dora@example.com", "role": "admin"}, format="json"
    )
    assert r.status_code == 201
    first = only("invitation.created")
    assert fields(first) | {"details": {}} == by_alice(
        alice_client,
        target_type="invitation",
        target_id=str(r.json()["id"]),
        target_label="dora@example.com",
        details={},
    )
    assert first.details["email"] == "dora@example.com" and first.details["role"] == "admin"
    assert r.json()["accept_token"] not in json.dumps(first.details)  # the secret is never logged
    assert alice_client.delete(f"{V1}/org/invitations/{r.json()['id']}").status_code == 204
    assert fields(only("invitation.revoked")) == by_alice(
        alice_client,
        target_type="invitation",
        target_id=str(r.json()["id"]),
        target_label="dora@example.com",
        details={"email": "dora@example.com", "role": "admin"},
    )

    again = alice_client.post(f"{V1}/org/invitations", {"email": "dora@example.com"}, format="json").json()
    dora = make_user("dora")
    session = client_for(None)
    session.force_login(dora)
    r = session.post(
        f"{V1}/invitations/accept", {"token": again["accept_token"]}, format="json", HTTP_USER_AGENT="b"
    )
    assert r.status_code == 201
    assert fields(only("invitation.accepted")) == {
        "organization": "acme",
        "actor_user": "dora",
        "actor_token": None,
        "actor_label": "dora",
        "target_type": "invitation",
        "target_id": str(again["id"]),
        "target_label": "dora@example.com",
        "ip": "127.0.0.1",
        "user_agent": "b",
        "details": {"email": "dora@example.com", "role": "member", "username": "dora"},
    }


def test_environment_secrets_created_and_deleted_never_hold_the_value(alice_client):
    value = "s3cr3t-value-that-must-not-be-logged"
    r = alice_client.post(f"{V1}/org/env-secrets", {"name": "api-key", "value": value}, format="json")
    assert r.status_code == 201
    created = only("env_secret.created")
    assert alice_client.delete(f"{V1}/org/env-secrets/api-key").status_code == 204
    deleted = only("env_secret.deleted")
    for entry in (created, deleted):
        assert fields(entry) == by_alice(
            alice_client,
            target_type="environmentsecret",
            target_id=created.target_id,
            target_label="api-key",
            details={},
        )
    assert not AuditEntry.objects.filter(details__icontains=value).exists()
    assert value not in str([fields(e) for e in AuditEntry.objects.all()])


def test_package_visibility_changed(alice_client, acme):
    package = EnvironmentPackage.objects.create(organization=acme, name="echo")
    r = alice_client.patch(f"{V1}/envs/acme/echo", {"visibility": "organization"}, format="json")
    assert r.status_code == 200, r.content
    assert fields(only("env.visibility_changed")) == by_alice(
        alice_client,
        target_type="environmentpackage",
        target_id=str(package.pk),
        target_label="acme/echo",
        details={"from": "private", "to": "organization"},
    )
    # A change of the description alone is not a visibility change.
    alice_client.patch(f"{V1}/envs/acme/echo", {"description": "hello"}, format="json")
    assert AuditEntry.objects.filter(action="env.visibility_changed").count() == 1


def _by_staff(as_staff, **rest) -> dict:
    token = ApiToken.objects.get(user__username="staffer")
    return {
        "actor_user": "staffer",
        "actor_token": token.pk,
        "actor_label": f"staffer (token {token.name}, otk_{token.lookup}_…)",
        "ip": "127.0.0.1",
        "user_agent": "",
        **rest,
    }


def test_quota_changed_by_staff(as_staff, acme):
    r = as_staff.patch(f"{V1}/admin/orgs/acme/quota", {"max_gpus": 4, "max_queued_jobs": 20}, format="json")
    assert r.status_code == 200, r.content
    assert fields(only("quota.changed")) == _by_staff(
        as_staff,
        organization="acme",
        target_type="quota",
        target_id=str(acme.pk),
        target_label="acme",
        details={"changes": {"max_gpus": {"from": 1, "to": 4}}},  # max_queued_jobs did not change
    )


def test_pools_created_changed_and_deleted_by_staff(as_staff):
    assert (
        as_staff.post(f"{V1}/admin/pools", {"name": "ray-a", "driver": "local"}, format="json").status_code
        == 201
    )
    created = only("pool.created")
    assert fields(created) == _by_staff(
        as_staff,
        organization=None,
        target_type="computepool",
        target_id=created.target_id,
        target_label="ray-a",
        details={"driver": "local", "ray_address": "", "enabled": True, "labels": {}},
    )
    assert as_staff.patch(f"{V1}/admin/pools/ray-a", {"enabled": False}, format="json").status_code == 200
    assert only("pool.updated").details == {"changes": {"enabled": {"from": True, "to": False}}}
    assert as_staff.delete(f"{V1}/admin/pools/ray-a").status_code == 204
    deleted = only("pool.deleted")
    assert (deleted.organization, deleted.target_label, deleted.details) == (
        None,
        "ray-a",
        {"driver": "local"},
    )


def test_preemption_and_priority_by_staff(as_staff, staffer, alice, acme):
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=example_rl_spec())
    job = job_transition(job=job, to=JobState.ADMITTED, actor=Actor.system("scheduler"))
    job_set_priority(job=job, priority=3, actor=Actor.for_request(staffer), reason="urgent")
    priority = only("job.priority_changed")
    assert (priority.organization, priority.actor_user, priority.target_id, priority.details) == (
        acme,
        staffer,
        str(job.pk),
        {"from": 0, "to": 3, "reason": "urgent"},
    )
    r = as_staff.post(f"{V1}/admin/jobs/{job.pk}/preempt", {"reason": "maintenance"}, format="json")
    assert r.status_code == 202, r.content
    assert fields(only("job.preempted")) == _by_staff(
        as_staff,
        organization="acme",
        target_type="job",
        target_id=str(job.pk),
        target_label=job.name,
        details={"reason": "maintenance", "state": "admitted", "attempt": 0},
    )


# --- who reads what ---------------------------------------------------------------------------------------


@pytest.fixture
def history(alice_client, as_charlie, as_staff, acme):
    """An entry in acme, one in globex, one platform-wide."""
    alice_client.post(f"{V1}/tokens", {"name": "acme-ci", "scopes": ["jobs:read"]}, format="json")
    as_charlie.post(f"{V1}/tokens", {"name": "globex-ci", "scopes": ["jobs:read"]}, format="json")
    as_staff.post(f"{V1}/admin/pools", {"name": "pool-z"}, format="json")


def labels(response) -> list[str]:
    return [e["target_label"].split(" ")[0] for e in response.json()["results"]]


def test_org_admin_sees_own_organization_only(alice_client, as_alice, history):
    r = alice_client.get(f"{V1}/org/audit")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"count", "next", "previous", "results"}
    # alice's fixture tokens and the one she made just now; nothing of globex, nothing platform-wide.
    assert {e["organization"] for e in body["results"]} == {"acme"}
    assert "acme-ci" in labels(r) and "globex-ci" not in labels(r) and "pool-z" not in labels(r)
    entry = next(e for e in body["results"] if e["target_label"].startswith("acme-ci"))
    assert entry["action"] == "token.created" and entry["ip"] == "127.0.0.1" and entry["user_agent"] == UA
    assert entry["actor_token"] == f"otk_{alice_client.token.lookup}_…"


def test_member_gets_403_and_outsider_sees_only_their_own(as_bob, as_charlie, charlie, history):
    r = as_bob.get(f"{V1}/org/audit")
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert as_bob.get(f"{V1}/org/audit/export").status_code == 403
    # The outsider's token is bound to globex: their log holds globex's entries and nothing of acme.
    r = as_charlie.get(f"{V1}/org/audit")
    assert r.status_code == 200 and {e["organization"] for e in r.json()["results"]} == {"globex"}
    assert "acme-ci" not in r.content.decode()
    # A session asking for acme's log is not a member of acme.
    session = client_for(None)
    session.force_login(charlie)
    r = session.get(f"{V1}/org/audit", HTTP_X_OPENTINKER_ORG="acme")
    assert r.status_code == 403
    # The staff API is not there for them at all.
    assert as_charlie.get(f"{V1}/admin/audit").status_code == 404
    assert client_for(None).get(f"{V1}/org/audit").status_code == 401


def test_staff_see_every_organization_and_filter(as_staff, history):
    r = as_staff.get(f"{V1}/admin/audit", {"limit": 200})
    assert r.status_code == 200
    assert {"acme-ci", "globex-ci", "pool-z"} <= set(labels(r))
    only_globex = as_staff.get(f"{V1}/admin/audit", {"organization": "globex"}).json()["results"]
    assert {e["organization"] for e in only_globex} == {"globex"}
    pools = as_staff.get(f"{V1}/admin/audit", {"action": "pool.created"}).json()["results"]
    assert [(e["target_label"], e["organization"]) for e in pools] == [("pool-z", None)]


def test_filters_and_pagination(alice_client, history):
    r = alice_client.get(f"{V1}/org/audit", {"action": "token.created", "actor": "alice", "limit": 1})
    body = r.json()
    assert (
        body["count"] == AuditEntry.objects.filter(organization__slug="acme", action="token.created").count()
    )
    assert len(body["results"]) == 1 and body["next"] is not None
    assert body["results"][0]["target_label"].startswith("acme-ci")  # newest first
    future = (timezone.now() + timedelta(hours=1)).isoformat()
    assert alice_client.get(f"{V1}/org/audit", {"since": future}).json()["count"] == 0
    everything = AuditEntry.objects.filter(organization__slug="acme").count()
    assert alice_client.get(f"{V1}/org/audit", {"until": future}).json()["count"] == everything
    for bad in (
        {"action": "nope"},
        {"since": "yesterday"},
        {"since": future, "until": future},
        {"colour": "x"},
    ):
        r = alice_client.get(f"{V1}/org/audit", bad)
        assert r.status_code == 400, bad
        assert r.json()["error"]["fields"], bad


def test_export_as_jsonl_and_csv(alice_client, history):
    r = alice_client.get(f"{V1}/org/audit/export", {"action": "token.created"})
    assert r.status_code == 200
    assert r["Content-Type"].startswith("application/x-ndjson")
    assert r["Content-Disposition"].startswith('attachment; filename="acme-audit-')
    rows = [json.loads(line) for line in b"".join(r.streaming_content).decode().splitlines()]
    listed = alice_client.get(f"{V1}/org/audit", {"action": "token.created"}).json()["results"]
    assert rows == listed

    r = alice_client.get(f"{V1}/org/audit/export", {"as": "csv"})
    assert r["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(b"".join(r.streaming_content).decode())))
    assert len(table) == alice_client.get(f"{V1}/org/audit").json()["count"]
    assert {row["organization"] for row in table} == {"acme"}
    assert alice_client.get(f"{V1}/org/audit/export", {"as": "xml"}).status_code == 400
    assert alice_client.get(f"{V1}/org/audit/export", {"limit": 5}).status_code == 400


def test_csv_export_defuses_formulas(alice_client, as_staff):
    alice_client.post(f"{V1}/tokens", {"name": "=HYPERLINK(1)", "scopes": ["jobs:read"]}, format="json")
    r = as_staff.get(f"{V1}/admin/audit/export", {"as": "csv", "organization": "acme"})
    table = list(csv.DictReader(io.StringIO(b"".join(r.streaming_content).decode())))
    assert any(row["target_label"].startswith("'=HYPERLINK(1)") for row in table)
    assert not any(cell.startswith("=") for row in table for cell in row.values())
