"""The package page's Settings section (issue 6) and private packages on the marketplace pages (issue 5).

Actors: alice (owner of acme) changes acme/echo's description, visibility and tags; bob (a plain member of
acme) is refused clearly (no form, a 403 that says why) and gets a 404 for a private package he did not
publish; charlie (owner of globex) gets 404 for acme's packages, and for the settings of a public one.
"""

from __future__ import annotations

import pytest

from env_registry.models import EnvironmentPackage, Star
from tests.api import test_envs
from tests.web.conftest import shot
from tests.web.pages import package_archive, signed_in, unlabelled_fields
from tests.web.test_marketplace import publish

pytestmark = pytest.mark.django_db
store = test_envs.store  # the API tests' object store in a temp directory (fixture)

URL = "/envs/acme/echo/settings/"
GOOD = {"description": "Echo, now documented", "visibility": "organization", "tags": "demo, games"}


def saved(name: str = "echo") -> tuple:
    p = EnvironmentPackage.objects.get(name=name)
    return p.description, p.visibility, p.tags


def test_an_admin_saves_the_settings(alice, acme, store):
    publish(acme, alice)
    client = signed_in(alice, acme)
    html = client.get("/envs/acme/echo/").content.decode()
    assert '<h2 id="settings-h">Settings</h2>' in html and unlabelled_fields(html) == []
    assert 'value="demo, single-turn"' in html and '<option value="private" selected>' in html
    resp = client.post(URL, GOOD)
    assert resp.status_code == 302 and resp["Location"] == "/envs/acme/echo/"
    assert saved() == ("Echo, now documented", "organization", ["demo", "games"])
    page = client.get("/envs/acme/echo/").content.decode()
    assert "Settings of acme/echo saved." in page and "Visibility: <strong>organization</strong>" in page


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"tags": "Not A Tag"}, "tags", ">tags are 1-32 lowercase letters, digits or dashes"),
        ({"tags": ",".join(f"t{i}" for i in range(17))}, "tags", "at most 16 tags"),
        ({"visibility": "world"}, "visibility", "Select a valid choice"),
        ({"description": "x" * 501}, "description", "at most 500 characters"),
    ],
)
def test_bad_settings_show_inline_errors_and_save_nothing(alice, acme, store, change, field, message):
    publish(acme, alice)
    before = saved()
    resp = signed_in(alice, acme).post(URL, {**GOOD, **change})
    html = resp.content.decode()
    assert resp.status_code == 400
    error = ">" + html.split(f'data-field="{field}">', 1)[1].split("</p>", 1)[0]
    assert message in error, error
    assert saved() == before


def test_a_member_is_refused_clearly(alice, bob, acme, store):
    publish(acme, alice, visibility="organization")
    client = signed_in(bob, acme)
    html = client.get("/envs/acme/echo/").content.decode()
    assert 'action="/envs/acme/echo/settings/"' not in html
    assert "Only an admin or owner of acme can change" in html
    resp = client.post(URL, GOOD)
    assert resp.status_code == 403
    reason = "Only an admin or owner of acme can change the settings of acme/echo (you are a member)."
    assert reason in resp.content.decode()
    assert saved() == ("Echoes the prompt", "organization", ["demo", "single-turn"])


def test_outsiders_get_404_even_on_a_public_package(alice, acme, charlie, globex, store):
    publish(acme, alice, visibility="public")
    client = signed_in(charlie, globex)
    html = client.get("/envs/acme/echo/").content.decode()
    assert "Settings" not in html  # visible, not his to change: no section at all
    assert client.post(URL, GOOD).status_code == 404
    assert client.post("/envs/acme/nothing/settings/", GOOD).status_code == 404
    EnvironmentPackage.objects.filter(name="echo").update(visibility="private")
    assert client.post(URL, GOOD).status_code == 404
    assert saved()[1] == "private"


def test_a_private_package_is_a_404_to_another_member_until_shared(alice, bob, acme, store):
    publish(acme, alice)  # private
    member = signed_in(bob, acme)
    assert member.get("/envs/acme/echo/").status_code == 404
    assert member.post("/envs/acme/echo/star/", {"starred": "1"}).status_code == 404
    assert member.post("/envs/acme/echo/fork/", {"name": "mine"}).status_code == 404
    assert member.post(URL, GOOD).status_code == 404
    assert "acme/echo" not in member.get("/envs/?q=echo").content.decode()
    assert "acme/echo@" not in member.get("/jobs/new/").content.decode()  # not offered to his jobs
    assert Star.objects.count() == 0 and EnvironmentPackage.objects.filter(organization=acme).count() == 1
    # Its admin shares it with the organization from the Settings section.
    signed_in(alice, acme).post(URL, {**GOOD, "tags": "demo"})
    assert member.get("/envs/acme/echo/").status_code == 200
    assert "acme/echo" in member.get("/envs/?q=echo").content.decode()
    assert "acme/echo@1.2.3" in member.get("/jobs/new/").content.decode()


def test_csrf_is_enforced_on_the_settings_form(alice, acme, store):
    publish(acme, alice)
    client = signed_in(alice, acme, csrf=True)
    assert client.post(URL, GOOD).status_code == 403
    assert saved()[1] == "private"
    client.get("/envs/acme/echo/")
    resp = client.post(URL, {**GOOD, "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
    assert resp.status_code == 302 and saved()[1] == "organization"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_admin_edits_the_settings(page, live_url, sign_in, alice, acme, store):
    from playwright.sync_api import expect

    publish(acme, alice, package_archive(name="echo"))
    sign_in(alice)
    page.goto("/envs/acme/echo/")
    page.get_by_label("Tags (comma-separated)").fill("Bad Tag")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator('[data-field="tags"]')).to_be_visible()
    page.get_by_label("Description").fill("Echo, edited in the browser")
    page.get_by_label("Visibility").select_option("public")
    page.get_by_label("Tags (comma-separated)").fill("demo, browser")
    shot(page, "env-settings")
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("status")).to_contain_text("Settings of acme/echo saved.")
    assert saved() == ("Echo, edited in the browser", "public", ["demo", "browser"])
