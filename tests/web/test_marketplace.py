"""Marketplace pages: browse and search, the package page, publish from a form, star, fork.

Actors: alice (owner of acme), bob (member of acme; a viewer in some tests), charlie (owner of globex), who
gets 404 for every private or organization package of acme, on every page and form.
"""

from __future__ import annotations

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from env_registry import services
from env_registry.models import EnvironmentPackage, EnvironmentVersion, Star
from portal.models import Membership, Role
from tests.api import test_envs
from tests.api.test_envs import stored_files
from tests.web.conftest import shot
from tests.web.pages import package_archive, signed_in, unlabelled_fields

pytestmark = pytest.mark.django_db
store = test_envs.store  # the API tests' object store in a temp directory (fixture)


def publish(org, user, data: bytes | None = None, visibility: str | None = None):
    import hashlib

    data = data or package_archive()
    return services.version_upload(
        organization=org, user=user, data=data, sha256=hashlib.sha256(data).hexdigest(), visibility=visibility
    )


def upload_form(client, data: bytes, **fields):
    archive = SimpleUploadedFile("echo.tar.gz", data, content_type="application/gzip")
    return client.post("/envs/publish/", {"archive": archive, **fields})


def names_in_order(html: str) -> list[str]:
    return re.findall(r'<a href="/envs/([a-z0-9_-]+/[a-z0-9_-]+)/">', html)


def test_publish_from_the_form_then_the_package_page(alice, acme, store):
    client = signed_in(alice, acme)
    page = client.get("/envs/publish/")
    assert page.status_code == 200 and unlabelled_fields(page.content.decode()) == []
    resp = upload_form(client, package_archive(), visibility="public")
    assert resp.status_code == 302 and resp["Location"] == "/envs/acme/echo/"
    version = EnvironmentVersion.objects.get(package__organization=acme, package__name="echo")
    assert (version.version, version.status, version.uploaded_by) == ("1.2.3", "valid", alice)
    assert version.package.visibility == "public"
    assert stored_files(store) == ["orgs/acme/envs/echo/1.2.3.tar.gz"]

    html = client.get("/envs/acme/echo/").content.decode()
    # The README is rendered by the registry's safe renderer: markup of its own, the script escaped.
    assert "<h1>Echo</h1>" in html and "<strong>things</strong>" in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "<td>1.2.3</td>" in html and "Valid" in html and version.sha256[:12] in html
    assert "<dt>entrypoint</dt><dd><code>echo_env:Echo</code></dd>" in html
    assert "<dt>tags</dt><dd><code>demo, single-turn</code></dd>" in html
    assert "environment: {ref: acme/echo@1.2.3}" in html
    assert "<td>alice</td>" in html  # the publisher, shown to the publisher's organization only
    assert unlabelled_fields(html) == []

    # A second version through the form; the same version again is refused and nothing changes.
    assert upload_form(client, package_archive(version="1.3.0")).status_code == 302
    resp = upload_form(client, package_archive(version="1.3.0"))
    assert resp.status_code == 400
    assert "already exists; versions are immutable" in resp.content.decode()
    assert sorted(version.package.versions.values_list("version", flat=True)) == ["1.2.3", "1.3.0"]
    assert "<td>1.3.0</td>" in client.get("/envs/acme/echo/").content.decode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: package_archive(version="1.2"), "version must be semver"),
        (lambda: b"definitely not a tarball", "not a readable .tar.gz"),
        (
            lambda: package_archive(entrypoint="nowhere:Echo"),
            "entrypoint module nowhere is not in the archive",
        ),
    ],
)
def test_bad_archive_shows_the_field_error_and_writes_nothing(alice, acme, store, data, message):
    resp = upload_form(signed_in(alice, acme), data())
    assert resp.status_code == 400
    html = resp.content.decode()
    assert 'data-field="archive"' in html and message in html
    assert not EnvironmentPackage.objects.filter(organization=acme).exists() and stored_files(store) == []


def test_oversized_archive_is_refused_before_it_is_read(alice, acme, store, settings):
    settings.ENV_ARCHIVE_MAX_BYTES = 1024 * 1024
    resp = upload_form(signed_in(alice, acme), b"x" * (1024 * 1024 + 70 * 1024))
    assert resp.status_code == 413 and "archive is over the 1 MB limit" in resp.content.decode()
    assert stored_files(store) == [] and not EnvironmentPackage.objects.filter(organization=acme).exists()


def test_a_viewer_cannot_publish_star_or_fork(alice, bob, acme, globex, charlie, store):
    Membership.objects.filter(user=bob, organization=acme).update(role=Role.VIEWER)
    publish(globex, charlie, visibility="public")
    client = signed_in(bob, acme)
    resp = upload_form(client, package_archive())
    assert resp.status_code == 403 and "envs:write" in resp.content.decode()
    assert client.post("/envs/globex/echo/star/", {"starred": "1"}).status_code == 403
    assert client.post("/envs/globex/echo/fork/", {"name": ""}).status_code == 403
    assert not EnvironmentPackage.objects.filter(organization=acme).exists() and Star.objects.count() == 0
    html = client.get("/envs/globex/echo/").content.decode()
    assert "Fork into your organization" not in html and "disabled" in html  # the star button


@pytest.mark.parametrize("visibility", ["private", "organization"])
def test_outsider_gets_404_on_a_private_package_everywhere(
    alice, bob, acme, charlie, globex, store, visibility
):
    publish(acme, alice, visibility=visibility)
    # A teammate sees an organization package; a private one only its publisher and the admins do
    # (tests/web/test_package_settings.py covers the private case for a teammate).
    teammate = 200 if visibility == "organization" else 404
    assert signed_in(bob, acme).get("/envs/acme/echo/").status_code == teammate
    assert signed_in(alice, acme).get("/envs/acme/echo/").status_code == 200
    outsider = signed_in(charlie, globex)
    assert outsider.get("/envs/acme/echo/").status_code == 404
    assert outsider.post("/envs/acme/echo/star/", {"starred": "1"}).status_code == 404
    assert outsider.post("/envs/acme/echo/fork/", {"name": "mine"}).status_code == 404
    assert outsider.get("/envs/acme/nothing-here/").status_code == 404
    assert "acme/echo" not in outsider.get("/envs/").content.decode()
    assert outsider.get("/envs/?q=echo").content.decode().count("acme/echo") == 0
    assert Star.objects.count() == 0 and not EnvironmentPackage.objects.filter(organization=globex).exists()


def test_browse_search_tags_and_sort(alice, bob, acme, charlie, globex, store):
    publish(acme, alice, visibility="public")
    publish(
        globex, charlie, package_archive(name="zeta", tags=["puzzles-x"], description="Zeta game"), "public"
    )
    publish(globex, charlie, package_archive(name="hidden", tags=["puzzles-x"]), "private")
    services.star_set(EnvironmentPackage.objects.get(name="zeta"), user=alice, starred=True)
    services.star_set(EnvironmentPackage.objects.get(name="zeta"), user=bob, starred=True)
    client = signed_in(alice, acme)
    page = client.get("/envs/")
    html = page.content.decode()
    assert unlabelled_fields(html) == []
    listed = names_in_order(html)
    # By name: the built-ins (opentinker/...) and the public packages; never globex's private one.
    assert "globex/hidden" not in listed and listed.index("acme/echo") < listed.index("globex/zeta")
    assert "opentinker/arithmetic" in listed
    assert names_in_order(client.get("/envs/?sort=stars").content.decode())[0] == "globex/zeta"
    assert names_in_order(client.get("/envs/?tag=puzzles-x").content.decode()) == ["globex/zeta"]
    assert names_in_order(client.get("/envs/?q=zeta+game").content.decode()) == ["globex/zeta"]
    assert names_in_order(client.get("/envs/?q=echoes").content.decode()) == ["acme/echo"]
    resp = client.get("/envs/?sort=loudest")
    assert resp.status_code == 200 and 'data-field="sort"' in resp.content.decode()
    # Charlie sees his own private package in his marketplace.
    assert "globex/hidden" in names_in_order(
        signed_in(charlie, globex).get("/envs/?tag=puzzles-x").content.decode()
    )


def test_the_list_is_paged_and_pages_keep_the_search(alice, acme, store, monkeypatch):
    from portal.web import marketplace

    monkeypatch.setattr(marketplace, "PAGE_SIZE", 4)
    publish(acme, alice)  # with the seven built-ins: 8 environments
    client = signed_in(alice, acme)
    first = client.get("/envs/?sort=name").content.decode()
    assert names_in_order(first) == [
        "acme/echo",
        "opentinker/answer-match",
        "opentinker/arithmetic",
        "opentinker/calculator",
    ]
    assert "Page 1 of 2 (8 environments)" in first and 'href="?q=&amp;tag=&amp;sort=name&amp;page=2"' in first
    second = client.get("/envs/?sort=name&page=2").content.decode()
    assert len(names_in_order(second)) == 4 and 'rel="prev"' in second and 'rel="next"' not in second
    assert names_in_order(client.get("/envs/?page=99").content.decode()) == names_in_order(second)
    assert "Page 1 of" not in client.get("/envs/?tag=demo").content.decode()  # one page: no pager


def test_star_and_unstar_with_and_without_htmx(alice, bob, acme, store):
    publish(acme, alice, visibility="organization")  # bob, a plain member, sees it
    client = signed_in(bob, acme)
    resp = client.post("/envs/acme/echo/star/", {"starred": "1"}, HTTP_HX_REQUEST="true")
    body = resp.content.decode()
    assert resp.status_code == 200 and '<span class="stars" data-testid="stars">1</span>' in body
    assert 'name="starred" value="0"' in body and "Starred" in body  # the next click unstars
    assert client.post("/envs/acme/echo/star/", {"starred": "1"}).status_code == 302  # idempotent
    assert Star.objects.filter(user=bob).count() == 1
    html = client.get("/envs/acme/echo/").content.decode()
    assert 'aria-pressed="true"' in html and '<span class="stars" data-testid="stars">1</span>' in html
    client.post("/envs/acme/echo/star/", {"starred": "0"})
    assert Star.objects.count() == 0


def test_fork_into_ones_organization(alice, acme, charlie, globex, store):
    publish(acme, alice, visibility="public")
    client = signed_in(charlie, globex)
    resp = client.post("/envs/acme/echo/fork/", {"name": ""})
    assert resp.status_code == 302 and resp["Location"] == "/envs/globex/echo/"
    fork = EnvironmentPackage.objects.get(organization=globex, name="echo")
    assert fork.visibility == "private" and fork.forked_from.organization == acme
    assert fork.versions.get().status == "valid"
    html = client.get("/envs/globex/echo/").content.decode()
    assert 'Forked from <a href="/envs/acme/echo/">acme/echo</a>' in html
    assert '<strong data-testid="forks">1</strong>' in client.get("/envs/acme/echo/").content.decode()
    # The name is taken now: the form says so on its field, and nothing is written.
    resp = client.post("/envs/acme/echo/fork/", {"name": "echo"})
    assert resp.status_code == 400
    assert 'data-field="name"' in resp.content.decode() and "already has an environment named echo" in (
        resp.content.decode()
    )
    resp = client.post("/envs/acme/echo/fork/", {"name": "Bad Name"})
    assert resp.status_code == 400 and "lowercase letters" in resp.content.decode()
    assert EnvironmentPackage.objects.filter(organization=globex).count() == 1
    # Built-ins have no archive: the refusal is shown on the page, not a server error.
    resp = client.post("/envs/opentinker/arithmetic/fork/", {"name": ""})
    assert resp.status_code == 400 and "has no archive to fork (built-in)" in resp.content.decode()


def test_csrf_is_enforced_on_every_marketplace_form(alice, acme, store):
    publish(acme, alice)
    client = signed_in(alice, acme, csrf=True)
    assert upload_form(client, package_archive(version="2.0.0")).status_code == 403
    assert client.post("/envs/acme/echo/star/", {"starred": "1"}).status_code == 403
    assert client.post("/envs/acme/echo/fork/", {"name": "copy"}).status_code == 403
    assert EnvironmentVersion.objects.filter(package__organization=acme).count() == 1
    assert Star.objects.count() == 0 and not EnvironmentPackage.objects.filter(name="copy").exists()
    # With the token the browser gets from the page, the same form goes through.
    client.get("/envs/acme/echo/")
    token = client.cookies["csrftoken"].value
    resp = client.post("/envs/acme/echo/star/", {"starred": "1", "csrfmiddlewaretoken": token})
    assert resp.status_code == 302 and Star.objects.count() == 1


def test_signed_out_visitors_are_sent_to_sign_in(client):
    resp = client.get("/envs/")
    assert resp.status_code == 302 and resp["Location"].startswith("/accounts/login/")


# ----------------------------------------------------------------------------------------------------
# In a real browser (chromium, W1's fixtures in tests/web/conftest.py)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_browser_publish_then_fork_from_another_organization(
    page, live_url, sign_in, alice, acme, charlie, globex, tmp_path
):
    from playwright.sync_api import expect

    archive = tmp_path / "echo-web.tar.gz"
    archive.write_bytes(package_archive(name="echo-web", tags=["demo", "browser"]))
    sign_in(alice)
    page.goto("/envs/publish/")
    page.get_by_label("Package archive").set_input_files(str(archive))
    page.get_by_label("Visibility").select_option("public")
    page.get_by_role("button", name="Publish").click()
    expect(page).to_have_url(f"{live_url}/envs/acme/echo-web/")
    expect(page.get_by_role("heading", name="acme/echo-web")).to_be_visible()
    expect(page.locator(".readme h1")).to_have_text("Echo")
    expect(page.get_by_role("cell", name="Valid")).to_be_visible()
    # Keyboard only: focus the star button and press Enter; htmx swaps the star form in place.
    page.get_by_role("button", name="Star").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("stars")).to_have_text("1")
    expect(page.get_by_role("button", name="Starred")).to_have_attribute("aria-pressed", "true")
    shot(page, "env-package")
    page.goto("/envs/?sort=stars")
    expect(page.get_by_role("link", name="acme/echo-web")).to_be_visible()
    shot(page, "marketplace")

    # Charlie, in his own organization's session, finds it and forks it.
    page.context.clear_cookies()
    sign_in(charlie)
    page.goto("/envs/?q=echo-web")
    page.get_by_role("link", name="acme/echo-web").click()
    page.get_by_label("Name in your organization").focus()  # Enter in the form's field submits it
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{live_url}/envs/globex/echo-web/")
    expect(page.get_by_text("Forked from")).to_contain_text("acme/echo-web")
    fork = EnvironmentPackage.objects.get(organization=globex, name="echo-web")
    assert fork.visibility == "private" and fork.forked_from.organization == acme
    assert fork.versions.get().version == "1.2.3"
