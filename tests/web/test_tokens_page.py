"""API tokens page: create (secret shown once, never stored, never rendered again), list, show, revoke.

Actors: alice (owner of acme), bob (member of acme: sees and revokes only his own tokens), charlie
(outsider, owner of globex: 404 on acme's token pages).
"""

from __future__ import annotations

import json
import re
import time
from unittest import mock

import pytest
from rest_framework.test import APIClient

from portal.models import ApiToken, Membership, Role
from portal.services.tokens import token_create
from tests.web.conftest import shot
from tests.web.pages import signed_in, unlabelled_fields

pytestmark = pytest.mark.django_db
SECRET_RE = re.compile(r"otk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")


def create(client, **data):
    return client.post(
        "/tokens/", {"name": "ci", "scopes": ["jobs:read", "jobs:write"], "expires_in_days": "30", **data}
    )


def secret_part(token: str) -> str:
    """The secret after `otk_<lookup>_` (it may itself hold "_": splitting at the last one could leave a
    two-character tail that any page contains by chance)."""
    return token.split("_", 2)[2]


def api_status(secret: str) -> int:
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return c.get("/api/v1/jobs").status_code


def test_the_secret_is_shown_once_works_and_is_never_rendered_again(alice, acme):
    c = signed_in(alice)
    # Post/redirect/get: the POST answers 303 to the page, so reloading it never re-POSTs the form.
    posted = create(c)
    assert posted.status_code == 303 and posted["Location"] == "/tokens/"
    assert SECRET_RE.search(posted.content.decode() + posted["Location"]) is None
    assert ApiToken.objects.count() == 1
    # The secret waits in the session, encrypted, for exactly one GET.
    kept = json.dumps(dict(c.session))
    r = c.get(posted["Location"])
    assert r.status_code == 200 and r["Cache-Control"].startswith("max-age=0")  # never_cache: no-store too
    assert "no-store" in r["Cache-Control"]
    (secret,) = set(SECRET_RE.findall(r.content.decode()))
    assert "shown only this once" in r.content.decode()
    assert secret not in kept and secret_part(secret) not in kept
    assert "tokens:new" not in c.session  # dropped by that GET
    assert SECRET_RE.search(c.get("/tokens/").content.decode()) is None  # the next GET shows it no more
    assert api_status(secret) == 200
    assert ApiToken.objects.count() == 1  # the GETs created nothing
    token = ApiToken.objects.get(organization=acme)
    assert token.name == "ci" and token.scopes == ["jobs:read", "jobs:write"] and token.expires_at
    # The database holds only a hash; no page shows the secret again.
    assert secret_part(secret) not in {token.secret_hash, token.lookup}
    for url in ("/tokens/", f"/tokens/{token.pk}/", "/"):
        html = c.get(url).content.decode()
        assert SECRET_RE.search(html) is None, url
        assert secret_part(secret) not in html, url
    assert f"otk_{token.lookup}_…" in c.get("/tokens/").content.decode()


def test_a_tinker_token_is_shown_with_the_tinker_sdk_key_prefix(alice, acme):
    c = signed_in(alice)
    page = c.get(create(c, scopes=["tinker"])["Location"]).content.decode()
    assert 'TINKER_API_KEY="tml-$OPENTINKER_TOKEN"' in page and "/tinker" in page
    plain = c.get(create(c, name="ci2")["Location"]).content.decode()
    assert "TINKER_API_KEY" not in plain


def test_htmx_create_answers_with_the_panel_only(alice, acme):
    c = signed_in(alice)
    r = c.post(
        "/tokens/",
        {"name": "laptop", "scopes": ["jobs:read"], "expires_in_days": ""},
        headers={"HX-Request": "true"},
    )
    html = r.content.decode()
    assert r.status_code == 200 and "<html" not in html and len(SECRET_RE.findall(html)) == 1
    assert "opentinker login --url http://testserver" in html  # the CLI and curl snippet
    assert ApiToken.objects.get(name="laptop").expires_at is None


def test_a_kept_secret_expires_unseen_and_stays_with_its_member_and_organization(alice, bob, acme):
    c = signed_in(alice)
    assert create(c).status_code == 303
    session = c.session
    assert set(session["tokens:new"]) == {"id", "secret"}
    from portal.web import tokens as tokens_page

    later = time.time() + tokens_page.ONCE_TTL_S + 1
    with mock.patch("time.time", return_value=later):  # Fernet's clock: the GET comes too late
        html = c.get("/tokens/").content.decode()
    assert SECRET_RE.search(html) is None and "tokens:new" not in c.session
    # A kept entry naming someone else's token is dropped, never shown.
    mine = ApiToken.objects.get()
    as_bob = signed_in(bob)
    s = as_bob.session
    s["tokens:new"] = {"id": mine.pk, "secret": tokens_page._fernet().encrypt(b"otk_x").decode()}
    s.save()
    html = as_bob.get("/tokens/").content.decode()
    assert "otk_x" not in html and "tokens:new" not in as_bob.session


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": ""}, "This field is required."),
        ({"scopes": []}, "This field is required."),
        (
            {"scopes": ["platform:admin"]},
            "Select a valid choice. platform:admin is not one of the available choices.",
        ),
        ({"expires_in_days": "9999"}, "Select a valid choice. 9999 is not one of the available choices."),
    ],
)
def test_bad_input_is_shown_inline_and_creates_nothing(alice, acme, data, message):
    r = create(signed_in(alice), **data)
    assert r.status_code == 400
    assert message in r.content.decode().replace("&#x27;", "'")
    assert SECRET_RE.search(r.content.decode()) is None
    assert ApiToken.objects.count() == 0


def test_a_viewer_may_only_grant_read_scopes(bob, acme):
    Membership.objects.filter(user=bob, organization=acme).update(role=Role.VIEWER)
    c = signed_in(bob)
    html = c.get("/tokens/").content.decode()
    assert re.findall(r'name="scopes" value="([a-z:]+)"', html) == ["jobs:read", "envs:read"]
    assert create(c).status_code == 400  # jobs:write is not on offer
    assert create(c, scopes=["jobs:read"]).status_code == 303


def test_teammates_see_and_revoke_only_their_own_tokens(alice, bob, acme):
    mine, _ = token_create(
        membership=Membership.objects.get(user=alice), name="alice-ci", scopes=["jobs:read"]
    )
    bobs, bob_secret = token_create(
        membership=Membership.objects.get(user=bob), name="bob-ci", scopes=["jobs:read"]
    )
    as_bob = signed_in(bob)
    assert "alice-ci" not in as_bob.get("/tokens/").content.decode()
    assert as_bob.get(f"/tokens/{mine.pk}/").status_code == 404
    assert as_bob.post(f"/tokens/{mine.pk}/revoke/").status_code == 404
    # The owner (org:admin) sees everyone's tokens and may revoke them.
    as_alice = signed_in(alice)
    assert "bob-ci" in as_alice.get("/tokens/").content.decode()
    r = as_alice.post(f"/tokens/{bobs.pk}/revoke/", follow=True)
    assert "Revoked the token “bob-ci”" in r.content.decode()
    assert api_status(bob_secret) == 401
    mine.refresh_from_db()
    assert mine.revoked_at is None


def test_outsider_gets_404_on_the_token_pages(alice, acme, charlie, globex):
    token, secret = token_create(
        membership=Membership.objects.get(user=alice), name="ci", scopes=["jobs:read"]
    )
    c = signed_in(charlie)
    assert c.get(f"/tokens/{token.pk}/").status_code == 404
    assert c.post(f"/tokens/{token.pk}/revoke/").status_code == 404
    assert "ci" not in re.findall(r'<a href="/tokens/\d+/">([^<]+)</a>', c.get("/tokens/").content.decode())
    assert api_status(secret) == 200  # still alive


def test_csrf_and_labels_on_the_token_forms(alice, acme):
    token, _ = token_create(membership=Membership.objects.get(user=alice), name="ci", scopes=["jobs:read"])
    c = signed_in(alice, csrf=True)
    assert create(c).status_code == 403
    assert c.post(f"/tokens/{token.pk}/revoke/").status_code == 403
    token.refresh_from_db()
    assert ApiToken.objects.count() == 1 and token.revoked_at is None
    plain = signed_in(alice)
    for url in ("/tokens/", f"/tokens/{token.pk}/"):
        assert unlabelled_fields(plain.get(url).content.decode()) == [], url


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_create_copy_reload_gone_then_revoke(page, live_url, sign_in, alice, acme):
    from playwright.sync_api import expect

    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_url)
    sign_in(alice)
    page.goto("/tokens/")
    page.get_by_label("Name").fill("laptop")
    page.get_by_label("Expires").select_option("7")
    page.get_by_role("button", name="Create token").click()  # htmx: the panel is swapped in place
    secret_box = page.locator("#token-secret")
    expect(secret_box).to_have_text(SECRET_RE)
    secret = secret_box.text_content().strip()
    expect(page).to_have_url(f"{live_url}/tokens/")
    page.get_by_role("button", name="Copy token").click()
    expect(page.locator("#copy-status")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    expect(page.get_by_role("link", name="laptop")).to_be_visible()
    shot(page, "tokens")
    assert api_status(secret) == 200

    page.reload()  # a GET: the secret is gone for good
    expect(page.locator("#token-secret")).to_have_count(0)
    assert secret not in page.content() and secret_part(secret) not in page.content()

    page.get_by_role("link", name="laptop").click()
    page.get_by_role("button", name="Revoke this token").click()
    expect(page.locator(".messages")).to_contain_text("Revoked the token “laptop”")
    assert api_status(secret) == 401


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_without_javascript_create_then_reload_shows_it_no_more_and_creates_nothing(
    browser, live_url, alice, acme
):
    from django.conf import settings
    from django.test import Client
    from playwright.sync_api import expect

    context = browser.new_context(base_url=live_url, java_script_enabled=False)
    try:
        client = Client()
        client.force_login(alice)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        context.add_cookies([{"name": cookie.key, "value": cookie.value, "url": live_url}])
        page = context.new_page()
        page.goto("/tokens/")
        page.get_by_label("Name").fill("nojs")
        page.get_by_role("button", name="Create token").click()  # a plain form POST, then the 303's GET
        expect(page).to_have_url(f"{live_url}/tokens/")
        secret = page.locator("#token-secret").text_content().strip()
        assert SECRET_RE.fullmatch(secret) and api_status(secret) == 200
        page.reload()  # the GET again, not the POST: no second token, no secret
        expect(page.locator("#token-secret")).to_have_count(0)
        assert secret_part(secret) not in page.content()
        assert ApiToken.objects.filter(name="nojs").count() == 1
    finally:
        context.close()
