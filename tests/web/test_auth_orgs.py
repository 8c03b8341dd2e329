"""Sign up (a user and their first organization), sign in and out, create an organization, and the
organization switcher (the session's organization is the one every page and the API work in).

Actors: alice (owner of acme and of initech), bob (member of acme), charlie (outsider, owner of globex).
"""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from portal.models import Membership, Organization, Role
from portal.services.orgs import organization_create
from portal.web.tenancy import SESSION_ORG_KEY
from tests.web.conftest import shot
from tests.web.pages import signed_in, unlabelled_fields
from tests.web.test_jobs_pages import field_errors, submit

pytestmark = pytest.mark.django_db
User = get_user_model()
SIGNUP = {
    "username": "dana",
    "email": "dana@example.com",
    "password": "purple-giraffe-42",
    "org_name": "Dana's Lab",
    "org_slug": "dana-lab",
}


def test_sign_up_creates_the_user_and_their_organization_and_signs_in(client):
    r = client.post("/accounts/signup/", SIGNUP)
    assert r.status_code == 302 and r["Location"] == "/"
    user = User.objects.get(username="dana")
    assert user.check_password("purple-giraffe-42") and user.email == "dana@example.com"
    (m,) = Membership.objects.filter(user=user).select_related("organization")
    assert (m.organization.slug, m.organization.name, m.role) == ("dana-lab", "Dana's Lab", Role.OWNER)
    assert client.session[SESSION_ORG_KEY] == "dana-lab"
    page = client.get("/").content.decode()
    assert "<h1>Dana&#x27;s Lab</h1>" in page and "You are owner of this organization." in page
    assert client.get("/accounts/signup/")["Location"] == "/"  # signed in: no second sign-up


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        (
            {"password": "short"},
            "password",
            "This password is too short. It must contain at least 10 characters.",
        ),
        ({"password": "1234567890123"}, "password", "This password is entirely numeric."),
        ({"username": "alice"}, "username", "that username is taken"),
        ({"org_slug": "acme"}, "org_slug", "the organization slug 'acme' is taken"),
        ({"org_slug": "-acme"}, "org_slug", "Use 1-40 lowercase letters, digits or dashes"),
        ({"org_slug": "has space"}, "org_slug", "Enter a valid “slug”"),
        ({"email": "not-an-email"}, "email", "Enter a valid email address."),
        ({"org_name": ""}, "org_name", "This field is required."),
    ],
)
def test_bad_sign_up_is_shown_inline_and_creates_nothing(client, alice, acme, changes, field, message):
    users, orgs = User.objects.count(), Organization.objects.count()
    r = client.post("/accounts/signup/", {**SIGNUP, **changes})
    assert r.status_code == 400
    errors = field_errors(r.content.decode())
    assert list(errors) == [field] and message in errors[field], errors
    # Both or neither: a taken organization id leaves no orphan user behind.
    assert (User.objects.count(), Organization.objects.count()) == (users, orgs)
    assert "_auth_user_id" not in client.session


def test_sign_in_and_out(client, alice, acme):
    page = client.get("/accounts/login/?next=/jobs/").content.decode()
    assert unlabelled_fields(page) == []
    bad = client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert "Your username and password didn't match." in bad.content.decode()
    r = client.post(
        "/accounts/login/", {"username": "alice", "password": "correct-horse-battery", "next": "/jobs/"}
    )
    assert r["Location"] == "/jobs/"
    assert client.post("/accounts/logout/")["Location"] == "/accounts/login/"
    assert client.get("/")["Location"].startswith("/accounts/login/")


def test_create_an_organization_and_work_in_it(alice, acme):
    c = signed_in(alice)
    assert unlabelled_fields(c.get("/orgs/new/").content.decode()) == []
    r = c.post("/orgs/new/", {"name": "Initech", "slug": "initech"})
    assert r["Location"] == "/"
    org = Organization.objects.get(slug="initech")
    assert Membership.objects.get(organization=org, user=alice).role == Role.OWNER
    assert org.quota.max_gpus == 1  # a new organization gets the default quota
    assert c.session[SESSION_ORG_KEY] == "initech"
    taken = c.post("/orgs/new/", {"name": "Acme again", "slug": "acme"})
    assert taken.status_code == 400
    assert field_errors(taken.content.decode()) == {"slug": "the organization slug 'acme' is taken"}
    assert Organization.objects.filter(name="Acme again").count() == 0


def test_the_switcher_changes_what_pages_and_the_api_show(alice, acme, charlie, globex):
    initech = organization_create(slug="initech", name="Initech", owner=alice)
    submit(acme, "acme-job")
    submit(initech, "initech-job")
    c = signed_in(alice, acme)
    switcher = c.get("/").content.decode()
    assert re.findall(r'<option value="([a-z-]+)"( selected)?>', switcher) == [
        ("acme", " selected"),
        ("initech", ""),
    ]
    assert "acme-job" in c.get("/jobs/").content.decode()
    r = c.post("/orgs/switch/", {"organization": "initech", "next": "/jobs/"})
    assert r["Location"] == "/jobs/"
    jobs = c.get("/jobs/").content.decode()
    assert "initech-job" in jobs and "acme-job" not in jobs
    assert c.get("/api/v1/org").json()["slug"] == "initech"  # the API reads the same session choice
    # An object page of the old organization would be a 404 in the new one: the switch lands on its list.
    job = submit(initech, "another")
    assert (
        c.post("/orgs/switch/", {"organization": "acme", "next": f"/jobs/{job.pk}/"})["Location"] == "/jobs/"
    )


def test_the_switcher_refuses_foreign_organizations_and_outside_redirects(alice, acme, charlie, globex):
    c = signed_in(alice, acme)
    r = c.post("/orgs/switch/", {"organization": "globex", "next": "/"}, follow=True)
    assert "You are not a member of that organization." in r.content.decode()
    assert c.session[SESSION_ORG_KEY] == "acme"
    for outside in ("https://evil.example/", "//evil.example/", "/\\evil.example/jobs/", "/%5Cevil/"):
        r = c.post("/orgs/switch/", {"organization": "acme", "next": outside})
        assert r["Location"] == "/", outside


def test_a_user_without_an_organization_is_asked_to_create_one(make_user):
    c = signed_in(make_user("loner"))
    r = c.get("/jobs/")
    assert r["Location"] == "/orgs/new/"


def test_csrf_on_the_account_and_organization_forms(alice, acme):
    anon = Client(enforce_csrf_checks=True)
    assert anon.post("/accounts/signup/", SIGNUP).status_code == 403
    assert (
        anon.post("/accounts/login/", {"username": "alice", "password": "correct-horse-battery"}).status_code
        == 403
    )
    c = signed_in(alice, acme, csrf=True)
    assert c.post("/orgs/new/", {"name": "X", "slug": "x"}).status_code == 403
    assert c.post("/orgs/switch/", {"organization": "acme"}).status_code == 403
    assert c.post("/accounts/logout/").status_code == 403
    assert (
        not User.objects.filter(username="dana").exists()
        and not Organization.objects.filter(slug="x").exists()
    )


def test_every_page_field_is_labelled_and_the_layout_has_landmarks(alice, acme):
    anon = Client()
    assert unlabelled_fields(anon.get("/accounts/signup/").content.decode()) == []
    html = signed_in(alice).get("/").content.decode()
    for landmark in ('<nav aria-label="Main">', '<main id="main"', '<a class="skip-link" href="#main">'):
        assert landmark in html
    assert '<a href="/" aria-current="page">Dashboard</a>' in html
    assert 'name="csrfmiddlewaretoken"' in html  # the switcher and sign-out forms
    assert "/console/" not in html  # Admin is for platform staff only


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_sign_up_create_an_organization_and_switch(page, live_url):
    from playwright.sync_api import expect

    page.goto("/accounts/signup/")
    for label, field in [
        ("Username", "username"),
        ("Email", "email"),
        ("Password", "password"),
        ("Organization name", "org_name"),
        ("Organization id", "org_slug"),
    ]:
        page.get_by_label(label, exact=True).fill(SIGNUP[field])
    shot(page, "signup")
    page.keyboard.press("Tab")  # from the last field to the submit button, then Enter: no mouse needed
    expect(page.get_by_role("button", name="Create account")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Dana's Lab")).to_be_visible()
    expect(page.locator(".messages")).to_contain_text("Welcome! You own the organization Dana's Lab.")

    page.get_by_role("link", name="New organization").click()
    page.get_by_label("Name").fill("Second Lab")
    page.get_by_label("Organization id").fill("second-lab")
    page.get_by_role("button", name="Create organization").click()
    expect(page.get_by_role("heading", name="Second Lab")).to_be_visible()
    expect(page.get_by_label("Organization")).to_have_value("second-lab")

    page.get_by_label("Organization").select_option("dana-lab")
    page.get_by_role("button", name="Switch").click()
    expect(page.get_by_role("heading", name="Dana's Lab")).to_be_visible()
    expect(page.locator(".messages")).to_contain_text("Now working in Dana's Lab.")

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{live_url}/accounts/login/")
    page.get_by_label("Username").fill("dana")
    page.get_by_label("Password").fill("purple-giraffe-42")
    shot(page, "login")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Dana's Lab")).to_be_visible()
