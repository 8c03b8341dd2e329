"""Helpers of the page tests (marketplace, team, usage, console): sessions, form labels, packages."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from django.test import Client

from portal.web.tenancy import SESSION_ORG_KEY
from tests.api.test_envs import MANIFEST, README, SOURCE, make_tar


def signed_in(user, org=None, *, csrf: bool = False) -> Client:
    """A browser session of `user` working in `org`; `csrf=True` enforces CSRF checks as a real browser."""
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    if org is not None:
        session = client.session
        session[SESSION_ORG_KEY] = org.slug
        session.save()
    return client


class _Fields(HTMLParser):
    """Every form control of a page, and which ids have a <label for=...>."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict] = []
        self.label_for: set[str] = set()
        self._label_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "label":
            self._label_depth += 1
            if a.get("for"):
                self.label_for.add(a["for"])
        elif tag in ("input", "select", "textarea"):
            if tag == "input" and a.get("type") in ("hidden", "submit", "button", "reset", "image"):
                return
            self.controls.append({**a, "_tag": tag, "_wrapped": self._label_depth > 0})

    def handle_endtag(self, tag):
        if tag == "label":
            self._label_depth = max(0, self._label_depth - 1)


def unlabelled_fields(html: str) -> list[str]:
    """The visible form controls of a page that no label names (for=id, wrapping label, or aria-label)."""
    p = _Fields()
    p.feed(html)
    return [
        f"{c['_tag']} name={c.get('name')!r}"
        for c in p.controls
        if not (c.get("id") in p.label_for or c["_wrapped"] or c.get("aria-label"))
    ]


def package_archive(readme: str = README.decode(), **manifest_changes) -> bytes:
    """An environment package (the API tests' echo environment) with its manifest changed."""
    files = {"opentinker.json": json.dumps({**MANIFEST, **manifest_changes}).encode(), "echo_env.py": SOURCE}
    return make_tar({**files, "README.md": readme.encode()})
