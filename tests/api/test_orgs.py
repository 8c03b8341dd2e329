"""Organizations, members and roles, invitations, quotas and the platform admin API.
Actors: alice (owner of acme), bob (member of acme), charlie (outsider, owner of globex)."""

from __future__ import annotations

import pytest

from portal.models import Invitation, Membership, Quota, Role
from tests.conftest import client_for

pytestmark = pytest.mark.django_db


def session_for(user):
    client = client_for(None)
    client.force_login(user)
    return client


def test_me_and_org_for_the_three_actors(as_alice, as_bob, as_charlie):
    assert as_alice.get("/api/v1/org").json()["role"] == "owner"
    bob = as_bob.get("/api/v1/me").json()
    assert (bob["organization"]["slug"], bob["role"]) == ("acme", "member")
    assert "org:admin" not in bob["scopes"]
    assert as_charlie.get("/api/v1/org").json()["slug"] == "globex"


def test_user_in_several_organizations_picks_one_per_request(alice, acme, globex, charlie):
    Membership.objects.create(organization=globex, user=alice, role=Role.VIEWER)
    session = session_for(alice)
    me = session.get("/api/v1/me").json()
    assert {o["slug"] for o in me["organizations"]} == {"acme", "globex"}
    assert session.get("/api/v1/org", HTTP_X_OPENTINKER_ORG="globex").json()["role"] == "viewer"
    assert session.get("/api/v1/org", HTTP_X_OPENTINKER_ORG="acme").json()["role"] == "owner"
    # An organization the user is not in is refused, not silently replaced.
    assert session.get("/api/v1/org", HTTP_X_OPENTINKER_ORG="initech").status_code == 403
    # A viewer cannot submit in globex even though alice owns acme.
    r = session.post("/api/v1/jobs", {}, format="json", HTTP_X_OPENTINKER_ORG="globex")
    assert r.status_code == 403


def test_create_organization_from_a_session(charlie):
    session = session_for(charlie)
    r = session.post("/api/v1/orgs", {"slug": "initech", "name": "Initech"}, format="json")
    assert r.status_code == 201
    assert Membership.objects.get(organization__slug="initech", user=charlie).role == Role.OWNER
    assert Quota.objects.filter(organization__slug="initech").exists()
    taken = session.post("/api/v1/orgs", {"slug": "initech", "name": "Again"}, format="json")
    assert taken.status_code == 409 and "slug" in taken.json()["error"]["fields"]
    bad = session.post("/api/v1/orgs", {"slug": "Not A Slug!", "name": "x"}, format="json")
    assert bad.status_code == 400 and "slug" in bad.json()["error"]["fields"]


def test_tokens_cannot_create_organizations(as_alice):
    assert as_alice.post("/api/v1/orgs", {"slug": "viatoken", "name": "x"}, format="json").status_code == 403


def test_members_and_roles(alice, bob, acme, as_alice, as_bob, as_charlie):
    members = as_bob.get("/api/v1/org/members").json()["results"]
    assert [(m["username"], m["role"]) for m in members] == [("alice", "owner"), ("bob", "member")]
    bob_id = Membership.objects.get(user=bob).pk
    alice_id = Membership.objects.get(user=alice).pk

    # A member cannot change roles; the outsider cannot even see the member.
    assert (
        as_bob.patch(f"/api/v1/org/members/{alice_id}", {"role": "viewer"}, format="json").status_code == 403
    )
    assert (
        as_charlie.patch(f"/api/v1/org/members/{bob_id}", {"role": "owner"}, format="json").status_code == 404
    )
    assert as_charlie.get(f"/api/v1/org/members/{bob_id}").status_code == 404

    r = as_alice.patch(f"/api/v1/org/members/{bob_id}", {"role": "admin"}, format="json")
    assert r.status_code == 200 and r.json()["role"] == "admin"
    # The last owner cannot step down.
    r = as_alice.patch(f"/api/v1/org/members/{alice_id}", {"role": "admin"}, format="json")
    assert r.status_code == 409 and "owner" in r.json()["error"]["message"]
    assert as_alice.patch(f"/api/v1/org/members/{bob_id}", {"role": "god"}, format="json").status_code == 400


def test_admin_cannot_make_owners(alice, bob, acme, make_token):
    Membership.objects.filter(user=bob).update(role=Role.ADMIN)
    as_admin = client_for(make_token(bob, acme))
    alice_id = Membership.objects.get(user=alice).pk
    bob_id = Membership.objects.get(user=bob).pk
    assert (
        as_admin.patch(f"/api/v1/org/members/{bob_id}", {"role": "owner"}, format="json").status_code == 403
    )
    assert as_admin.delete(f"/api/v1/org/members/{alice_id}").status_code == 403
    assert Membership.objects.get(user=alice).role == Role.OWNER


def test_invitation_round_trip(alice, acme, as_alice, as_bob, as_charlie, make_user):
    r = as_alice.post(
        "/api/v1/org/invitations", {"email": "Dana@Example.com", "role": "viewer"}, format="json"
    )
    assert r.status_code == 201
    secret = r.json()["accept_token"]
    inv_id = r.json()["id"]
    assert r.json()["email"] == "dana@example.com"
    assert secret not in str(Invitation.objects.values_list().get(pk=inv_id))

    listing = as_alice.get("/api/v1/org/invitations").json()["results"]
    assert [i["id"] for i in listing] == [inv_id] and "accept_token" not in listing[0]
    # Members without org:admin and outsiders see nothing.
    assert as_bob.get("/api/v1/org/invitations").status_code == 403
    assert as_charlie.get("/api/v1/org/invitations").json()["count"] == 0
    assert as_charlie.delete(f"/api/v1/org/invitations/{inv_id}").status_code == 404

    # Someone else cannot use the link; the invitee can, once.
    charlie_session = session_for(Membership.objects.get(organization__slug="globex").user)
    r = charlie_session.post("/api/v1/invitations/accept", {"token": secret}, format="json")
    assert r.status_code == 403
    dana = make_user("dana")
    dana.email = "dana@example.com"
    dana.save()
    dana_session = session_for(dana)
    assert (
        dana_session.post("/api/v1/invitations/accept", {"token": secret}, format="json").status_code == 201
    )
    assert Membership.objects.get(user=dana, organization=acme).role == Role.VIEWER
    assert (
        dana_session.post("/api/v1/invitations/accept", {"token": secret}, format="json").status_code == 404
    )
    assert (
        dana_session.post("/api/v1/invitations/accept", {"token": "nope"}, format="json").status_code == 404
    )


def test_invitation_cannot_exceed_inviter_role(bob, acme, make_token):
    Membership.objects.filter(user=bob).update(role=Role.ADMIN)
    as_admin = client_for(make_token(bob, acme))
    r = as_admin.post("/api/v1/org/invitations", {"email": "x@example.com", "role": "owner"}, format="json")
    assert r.status_code == 403
    assert Invitation.objects.count() == 0


def test_quota_is_readable_by_every_member(as_alice, as_bob, as_charlie, acme):
    Quota.objects.filter(organization=acme).update(max_gpus=8, allowed_pools=["h100"])
    for client in (as_alice, as_bob):
        quota = client.get("/api/v1/org/quota").json()
        assert (quota["max_gpus"], quota["allowed_pools"]) == (8, ["h100"])
    assert as_charlie.get("/api/v1/org/quota").json()["max_gpus"] == 1  # his own default


@pytest.fixture
def staffer(make_user, globex):
    user = make_user("staffer", staff=True)
    Membership.objects.create(organization=globex, user=user, role=Role.MEMBER)
    return user


def test_only_staff_change_quotas(staffer, globex, acme, as_alice, as_charlie, make_token):
    url = "/api/v1/admin/orgs/acme/quota"
    # Tenants, even owners, do not learn the admin API exists.
    for client in (as_alice, as_charlie):
        assert client.get(url).status_code == 404
        assert client.patch(url, {"max_gpus": 64}, format="json").status_code == 404
        assert client.get("/api/v1/admin/orgs").status_code == 404
    assert client_for(None).get(url).status_code == 401
    # A staff member's everyday token lacks platform:admin.
    everyday = client_for(make_token(staffer, globex, scopes=["jobs:read"]))
    assert everyday.patch(url, {"max_gpus": 64}, format="json").status_code == 404

    admin = client_for(make_token(staffer, globex, scopes=["platform:admin"]))
    r = admin.patch(
        url, {"max_gpus": 16, "borrowing_limit_gpus": 4, "allowed_pools": ["h100"]}, format="json"
    )
    assert r.status_code == 200
    assert (r.json()["max_gpus"], r.json()["borrowing_limit_gpus"], r.json()["gpu_hours_per_month"]) == (
        16,
        4,
        100,
    )
    assert as_alice.get("/api/v1/org/quota").json()["max_gpus"] == 16

    bad = admin.patch(url, {"max_gpus": -1}, format="json")
    assert bad.status_code == 400 and "max_gpus" in bad.json()["error"]["fields"]
    assert admin.patch(url, {"fair_share_weight": 0}, format="json").status_code == 400
    assert admin.patch(url, {"organization": "globex"}, format="json").status_code == 400
    assert admin.get("/api/v1/admin/orgs/nope/quota").status_code == 404
    slugs = [o["slug"] for o in admin.get("/api/v1/admin/orgs").json()["results"]]
    assert slugs == ["acme", "globex", "opentinker"]
    # A browser session of a staff user works too.
    assert session_for(staffer).get(url).json()["max_gpus"] == 16


def test_password_login_for_the_browser(alice):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    page = browser.get("/accounts/login/")
    assert page.status_code == 200
    csrf = page.cookies["csrftoken"].value
    wrong = browser.post(
        "/accounts/login/", {"username": "alice", "password": "nope", "csrfmiddlewaretoken": csrf}
    )
    assert wrong.status_code == 200 and b"didn't match" in wrong.content
    ok = browser.post(
        "/accounts/login/",
        {"username": "alice", "password": "correct-horse-battery", "csrfmiddlewaretoken": csrf},
    )
    assert ok.status_code == 302 and ok["Location"] == "/"
    # Signed in without an organization yet: the portal sends alice to create her first one.
    home = browser.get("/", follow=True)
    assert home.redirect_chain == [("/orgs/new/", 302)]
    assert b"alice" in home.content and b"Sign out" in home.content
    # Session-authenticated API writes need the CSRF token, like any form.
    r = browser.post("/api/v1/orgs", {"slug": "csrf-test", "name": "x"}, content_type="application/json")
    assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
