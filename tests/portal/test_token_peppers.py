"""Several token peppers: one can be rotated in without revoking every token, and retired to end the tokens
nobody used since. Actors: alice (owner of acme)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from opentinker.spec import example_rl_spec
from portal.actors import Actor
from portal.env import token_peppers
from portal.models import ApiToken
from portal.services.job_tokens import job_token_issue, job_token_verify
from portal.services.jobs import job_submit
from portal.services.orgs import invitation_accept, invitation_create
from portal.services.tokens import token_authenticate
from tests.conftest import _membership, client_for

OLD = "old-pepper-" + "o" * 32
NEW = "new-pepper-" + "n" * 32


@pytest.fixture
def old_pepper(settings):
    settings.TOKEN_PEPPERS = {"1": OLD}
    return settings


def _row(secret: str) -> ApiToken:
    return ApiToken.objects.get(lookup=secret.split("_")[1])


@pytest.mark.django_db
def test_new_tokens_are_hashed_under_the_newest_pepper(old_pepper, alice, acme, make_token):
    old_pepper.TOKEN_PEPPERS = {"2": NEW, "1": OLD}
    secret = make_token(alice, acme)
    assert _row(secret).pepper_id == "2"
    old_pepper.TOKEN_PEPPERS = {"2": NEW}  # retiring the old pepper does not touch it
    assert client_for(secret).get("/api/v1/me").status_code == 200


@pytest.mark.django_db
def test_a_token_of_the_old_pepper_works_after_a_new_one_is_added_and_moves_to_it(
    old_pepper, alice, acme, make_token
):
    secret = make_token(alice, acme)
    before = _row(secret)
    assert before.pepper_id == "1"
    old_pepper.TOKEN_PEPPERS = {"2": NEW, "1": OLD}
    assert client_for(secret).get("/api/v1/me").status_code == 200
    after = _row(secret)
    assert after.pepper_id == "2" and after.secret_hash != before.secret_hash  # rehashed on use
    old_pepper.TOKEN_PEPPERS = {"2": NEW}
    assert client_for(secret).get("/api/v1/me").status_code == 200  # so retiring the old one spares it


@pytest.mark.django_db
def test_removing_the_old_pepper_invalidates_tokens_not_used_since(old_pepper, alice, acme, make_token):
    secret = make_token(alice, acme)
    old_pepper.TOKEN_PEPPERS = {"2": NEW, "1": OLD}
    old_pepper.TOKEN_PEPPERS = {"2": NEW}  # never used in between
    assert token_authenticate(secret) is None
    r = client_for(secret).get("/api/v1/me")
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "invalid, expired or revoked token"
    assert _row(secret).pepper_id == "1"  # a refused token is not rewritten


@pytest.mark.django_db
def test_an_invitation_of_the_old_pepper_can_still_be_accepted(old_pepper, alice, acme, make_user):
    _, secret = invitation_create(by=_membership(alice, acme), email="dora@example.com", role="member")
    old_pepper.TOKEN_PEPPERS = {"2": NEW, "1": OLD}
    dora = make_user("dora")
    assert invitation_accept(secret=secret, user=dora).organization == acme


@pytest.mark.django_db
def test_job_tokens_signed_before_a_rotation_still_verify(settings, alice, acme):
    job, _ = job_submit(organization=acme, actor=Actor.for_request(alice), spec=example_rl_spec())
    raw = job_token_issue(job)
    settings.TOKEN_PEPPERS = {"9": NEW, **settings.TOKEN_PEPPERS}
    assert job_token_verify(raw) == job
    settings.TOKEN_PEPPERS = {"9": NEW}
    assert job_token_verify(raw) is None


def test_pepper_configuration():
    assert token_peppers("b:" + NEW + ", a:" + OLD, None) == {"b": NEW, "a": OLD}
    assert list(token_peppers("b:" + NEW, OLD)) == ["b", "0"]  # the single TOKEN_PEPPER is the oldest
    assert token_peppers(None, OLD) == {"0": OLD}
    for bad in ("nocolon", "bad id!:x", "a:", "a:x,a:y"):
        with pytest.raises(ImproperlyConfigured, match="TOKEN_PEPPERS"):
            token_peppers(bad, None)
    with pytest.raises(ImproperlyConfigured, match="TOKEN_PEPPER must be set"):
        token_peppers("", None)
