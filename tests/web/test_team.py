"""Team pages: members and roles, invitations (create, list, revoke, accept by link).

Actors: alice (owner of acme), bob (member of acme), charlie (owner of globex), who gets 404 for every member
and invitation of acme. The rules are portal.services.orgs', the same as the API's.
"""

from __future__ import annotations

import re

import pytest

from portal.models import ApiToken, Invitation, Membership, Role
from portal.services.orgs import invitation_create
from tests.web.conftest import shot
from tests.web.pages import signed_in, unlabelled_fields

pytestmark = pytest.mark.django_db


def member(user, org) -> Membership:
    return Membership.objects.get(user=user, organization=org)


def role_of(user, org) -> str:
    return member(user, org).role


def test_owner_sees_members_and_changes_a_role(alice, bob, acme):
    client = signed_in(alice, acme)
    html = client.get("/team/").content.decode()
    assert unlabelled_fields(html) == []
    assert 'data-member="alice"' in html and 'data-member="bob"' in html
    assert "Role of bob" in html and "Create invitation" in html
    bob_m = member(bob, acme)
    resp = client.post(f"/team/members/{bob_m.pk}/role/", {"role": "viewer"})
    assert resp.status_code == 302 and role_of(bob, acme) == "viewer"
    resp = client.post(f"/team/members/{bob_m.pk}/role/", {"role": "emperor"})
    assert resp.status_code == 400 and role_of(bob, acme) == "viewer"


def test_a_member_cannot_change_roles_remove_others_or_invite(alice, bob, acme):
    client = signed_in(bob, acme)
    html = client.get("/team/").content.decode()
    assert "Role of alice" not in html and "Create invitation" not in html and ">Remove<" not in html
    alice_m = member(alice, acme)
    resp = client.post(f"/team/members/{alice_m.pk}/role/", {"role": "viewer"})
    assert resp.status_code == 403 and "only an owner or admin" in resp.content.decode()
    resp = client.post(f"/team/members/{member(bob, acme).pk}/role/", {"role": "admin"})
    assert resp.status_code == 403 and role_of(bob, acme) == "member"  # nor promote himself
    assert client.post(f"/team/members/{alice_m.pk}/remove/").status_code == 403
    resp = client.post("/team/invitations/", {"email": "dave@example.com", "role": "member"})
    assert resp.status_code == 403
    assert role_of(alice, acme) == "owner" and Invitation.objects.count() == 0
    # Anyone may leave; his tokens of acme die with the membership.
    bob_m = member(bob, acme)
    assert client.post(f"/team/members/{bob_m.pk}/remove/").status_code == 302
    assert not Membership.objects.filter(user=bob, organization=acme).exists()


def test_an_admin_cannot_grant_owner_and_the_last_owner_stays(alice, bob, acme):
    Membership.objects.filter(user=bob, organization=acme).update(role=Role.ADMIN)
    client = signed_in(bob, acme)
    resp = client.post(f"/team/members/{member(bob, acme).pk}/role/", {"role": "owner"})
    assert resp.status_code == 403 and "only an owner can grant or remove the owner role" in (
        resp.content.decode()
    )
    resp = client.post(f"/team/members/{member(alice, acme).pk}/remove/")
    assert resp.status_code == 403 and role_of(alice, acme) == "owner"
    owner = signed_in(alice, acme)
    resp = owner.post(f"/team/members/{member(alice, acme).pk}/role/", {"role": "member"})
    assert resp.status_code == 409 and "must keep at least one owner" in resp.content.decode()
    resp = owner.post(f"/team/members/{member(alice, acme).pk}/remove/")
    assert resp.status_code == 409 and role_of(alice, acme) == "owner"
    assert owner.post(f"/team/members/{member(bob, acme).pk}/remove/").status_code == 302
    assert not Membership.objects.filter(user=bob, organization=acme).exists()


def test_removing_a_member_revokes_their_tokens(alice, bob, acme, make_token):
    make_token(bob, acme)
    signed_in(alice, acme).post(f"/team/members/{member(bob, acme).pk}/remove/")
    assert ApiToken.objects.filter(user=bob, revoked_at__isnull=True).count() == 0


def test_outsider_gets_404_on_every_member_and_invitation(alice, bob, acme, charlie, globex):
    invitation, _ = invitation_create(by=member(alice, acme), email="dave@example.com", role="member")
    client = signed_in(charlie, globex)
    for url, data in [
        (f"/team/members/{member(bob, acme).pk}/role/", {"role": "viewer"}),
        (f"/team/members/{member(alice, acme).pk}/role/", {"role": "viewer"}),
        (f"/team/members/{member(bob, acme).pk}/remove/", {}),
        (f"/team/invitations/{invitation.pk}/revoke/", {}),
        ("/team/members/999999/remove/", {}),
    ]:
        assert client.post(url, data).status_code == 404, url
    assert role_of(bob, acme) == "member" and Invitation.objects.get().revoked_at is None
    html = client.get("/team/").content.decode()
    assert "bob" not in html and "dave@example.com" not in html


def test_invite_shows_the_link_once_then_lists_and_revokes(alice, acme):
    client = signed_in(alice, acme)
    resp = client.post("/team/invitations/", {"email": "Dave@Example.com", "role": "admin"})
    assert resp.status_code == 201
    html = resp.content.decode()
    link = re.search(r'value="(http://testserver/invitations/accept/\?token=[^"]+)"', html).group(1)
    token = link.split("token=")[1]
    invitation = Invitation.objects.get()
    assert (invitation.email, invitation.role) == ("dave@example.com", "admin")
    assert token not in invitation.secret_hash
    listing = client.get("/team/").content.decode()
    assert 'data-invitation="dave@example.com"' in listing and token not in listing  # never shown again
    # Bad input: field errors, nothing stored.
    resp = client.post("/team/invitations/", {"email": "not-an-address", "role": "member"})
    assert resp.status_code == 400 and 'data-field="email"' in resp.content.decode()
    resp = client.post("/team/invitations/", {"email": "alice@example.com", "role": "member"})
    assert resp.status_code == 400 and "alice@example.com is already a member" in resp.content.decode()
    assert Invitation.objects.count() == 1
    assert client.post(f"/team/invitations/{invitation.pk}/revoke/").status_code == 302
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None
    assert 'data-invitation="dave@example.com"' not in client.get("/team/").content.decode()


def test_accept_by_link(alice, acme, make_user):
    _, secret = invitation_create(by=member(alice, acme), email="dave@example.com", role="viewer")
    dave, eve = make_user("dave"), make_user("eve")
    url = f"/invitations/accept/?token={secret}"
    # The link is for dave's address: eve may look but not join.
    eve_client = signed_in(eve)
    page = eve_client.get(url)
    assert page.status_code == 200 and unlabelled_fields(page.content.decode()) == []
    resp = eve_client.post("/invitations/accept/", {"token": secret})
    assert resp.status_code == 403 and "sent to another e-mail address" in resp.content.decode()
    assert not Membership.objects.filter(user=eve).exists()
    # A GET never joins; the POST does, and makes acme the session's organization.
    dave_client = signed_in(dave)
    assert dave_client.get(url).status_code == 200 and not Membership.objects.filter(user=dave).exists()
    resp = dave_client.post("/invitations/accept/", {"token": secret})
    assert resp.status_code == 302 and resp["Location"] == "/team/"
    assert role_of(dave, acme) == "viewer"
    assert 'data-member="dave"' in dave_client.get("/team/").content.decode()
    # Used once; a wrong or used token is a 404.
    assert dave_client.post("/invitations/accept/", {"token": secret}).status_code == 404
    assert dave_client.post("/invitations/accept/", {"token": "nope"}).status_code == 404
    assert dave_client.get("/invitations/accept/").status_code == 404


def test_the_accept_page_names_the_organization_and_role_only_to_the_invited_address(
    alice, acme, charlie, make_user
):
    from datetime import timedelta

    from django.utils import timezone

    _, secret = invitation_create(by=member(alice, acme), email="dave@example.com", role="admin")
    url = f"/invitations/accept/?token={secret}"
    html = signed_in(make_user("dave")).get(url).content.decode()
    offer = html.split('data-testid="invitation-offer">', 1)[1].split("</p>", 1)[0]
    assert "<strong>Acme</strong> (<code>acme</code>)" in offer and "as <strong>Admin</strong>" in offer
    assert "sent by\n  alice" in offer
    # A forwarded link: its holder learns only that it is not theirs (and which organization, never).
    for other in (make_user("eve"), charlie):
        page = signed_in(other).get(url)
        body = page.content.decode()
        assert page.status_code == 200 and 'data-testid="invitation-not-yours"' in body
        assert "Acme" not in body and "Admin" not in body and "invitation-offer" not in body
    # A wrong, revoked or expired secret shows nothing at all.
    assert signed_in(alice).get("/invitations/accept/?token=nope").status_code == 404
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert signed_in(make_user("dave2")).get(url).status_code == 404


def test_csrf_is_enforced_on_every_team_form(alice, bob, acme, make_user):
    _, secret = invitation_create(by=member(alice, acme), email="dave@example.com", role="member")
    invitation = Invitation.objects.get()
    client = signed_in(alice, acme, csrf=True)
    bob_m = member(bob, acme)
    for url, data in [
        (f"/team/members/{bob_m.pk}/role/", {"role": "viewer"}),
        (f"/team/members/{bob_m.pk}/remove/", {}),
        ("/team/invitations/", {"email": "erin@example.com", "role": "member"}),
        (f"/team/invitations/{invitation.pk}/revoke/", {}),
    ]:
        assert client.post(url, data).status_code == 403, url
    dave = signed_in(make_user("dave"), csrf=True)
    assert dave.post("/invitations/accept/", {"token": secret}).status_code == 403
    assert role_of(bob, acme) == "member" and Invitation.objects.count() == 1
    assert Invitation.objects.get().revoked_at is None and Invitation.objects.get().accepted_at is None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_invite_and_accept_by_link(page, live_url, sign_in, alice, bob, acme, make_user):
    from playwright.sync_api import expect

    sign_in(alice)
    page.goto("/team/")
    page.get_by_label("E-mail address").fill("dave@example.com")
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Create invitation").click()
    link = page.get_by_label("Invitation link").input_value()
    assert link.startswith(f"{live_url}/invitations/accept/?token=")
    expect(page.locator('tr[data-invitation="dave@example.com"]')).to_be_visible()
    page.goto("/team/")
    shot(page, "team")
    assert link.split("token=")[1] not in page.content()  # shown once

    page.context.clear_cookies()
    sign_in(make_user("dave"))
    page.goto(link)
    page.get_by_role("button", name="Accept the invitation").click()
    expect(page).to_have_url(f"{live_url}/team/")
    expect(page.locator('tr[data-member="dave"]')).to_contain_text("Viewer")
    assert role_of(Membership.objects.get(user__username="dave").user, acme) == "viewer"
