"""Audit log pages: Team → Audit log for an organization's admins, the console's for staff, with downloads.

Actors: alice (owner of acme), bob (member of acme), charlie (owner of globex), a staffer."""

from __future__ import annotations

import csv
import io
import json

import pytest

from portal.models import AuditEntry, Membership
from portal.services.orgs import membership_set_role
from portal.services.pools import pool_create
from tests.web.pages import signed_in

pytestmark = pytest.mark.django_db


@pytest.fixture
def history(alice, bob, acme, globex, make_token):
    alice_m = Membership.objects.get(user=alice, organization=acme)
    membership_set_role(by=alice_m, target=Membership.objects.get(user=bob, organization=acme), role="viewer")
    make_token(alice, acme)
    pool_create(name="pool-z")


def test_an_admin_reads_and_downloads_their_organizations_log(alice, acme, history):
    client = signed_in(alice, acme)
    page = client.get("/team/")
    assert 'href="/team/audit/"' in page.content.decode()
    r = client.get("/team/audit/")
    html = r.content.decode()
    assert r.status_code == 200 and "Audit log of Acme" in html
    assert 'data-action="member.role_changed"' in html and 'data-action="token.created"' in html
    assert "pool-z" not in html and "globex" not in html  # nothing platform-wide, nothing of another org
    filtered = client.get("/team/audit/", {"action": "member.role_changed"}).content.decode()
    assert 'data-action="token.created"' not in filtered and "&quot;to&quot;: &quot;viewer&quot;" in filtered

    r = client.get("/team/audit/export/", {"as": "csv"})
    assert r.status_code == 200 and r["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(r.streaming_content).decode())))
    assert len(rows) == AuditEntry.objects.filter(organization=acme).count() >= 2
    assert {row["organization"] for row in rows} == {"acme"}
    r = client.get("/team/audit/export/", {"as": "jsonl", "action": "member.role_changed"})
    lines = [json.loads(x) for x in b"".join(r.streaming_content).decode().splitlines()]
    assert [(x["action"], x["details"]["to"]) for x in lines] == [("member.role_changed", "viewer")]
    assert client.get("/team/audit/export/", {"as": "xml"}).status_code == 400
    assert client.get("/team/audit/", {"since": "not a time"}).status_code == 400


def test_a_member_gets_403_and_an_outsider_only_their_own(bob, charlie, acme, globex, history):
    for url in ("/team/audit/", "/team/audit/export/"):
        r = signed_in(bob, acme).get(url)
        assert r.status_code == 403 and "org:admin" in r.content.decode()
    # charlie cannot pick acme (he is no member): he reads globex's log, which holds nothing of acme.
    html = signed_in(charlie, acme).get("/team/audit/").content.decode()
    assert "Audit log of Globex" in html and 'data-action="member.role_changed"' not in html
    assert signed_in(charlie, globex).get("/console/audit/").status_code == 404


def test_staff_read_every_organizations_log_in_the_console(make_user, history):
    staffer = make_user("staffer", staff=True)
    client = signed_in(staffer)
    r = client.get("/console/audit/")
    html = r.content.decode()
    assert r.status_code == 200 and 'href="/console/audit/"' in html
    assert "pool-z" in html and 'data-action="member.role_changed"' in html
    only_pools = client.get("/console/audit/", {"action": "pool.created"}).content.decode()
    assert "pool-z" in only_pools and 'data-action="member.role_changed"' not in only_pools
    r = client.get("/console/audit/export/", {"as": "jsonl", "organization": "acme"})
    lines = [json.loads(x) for x in b"".join(r.streaming_content).decode().splitlines()]
    assert lines and {x["organization"] for x in lines} == {"acme"}
    assert client.get("/console/audit/export/", {"as": "csv"}).status_code == 200


def test_the_django_admin_shows_the_log_read_only(django_user_model, history):
    root = django_user_model.objects.create_superuser("root", "r@example.com", "x" * 12)
    client = signed_in(root)
    entry = AuditEntry.objects.filter(action="member.role_changed").get()
    assert client.get("/django-admin/portal/auditentry/").status_code == 200
    assert client.get("/django-admin/portal/auditentry/add/").status_code == 403
    delete = client.post(f"/django-admin/portal/auditentry/{entry.pk}/delete/", {"post": "yes"})
    assert delete.status_code == 403
    assert AuditEntry.objects.filter(pk=entry.pk).exists()
