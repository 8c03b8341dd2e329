"""Sign-in lock-out and sign-up throttling (portal/services/throttle.py) through the portal's pages and the
Django admin's sign-in. Time is moved with the module's injectable clock, never slept.

Actors: alice (owner of acme) under attack, bob (her teammate), a staffer for the Django admin."""

from __future__ import annotations

import pytest
from django.test import Client

from portal.services import throttle

pytestmark = pytest.mark.django_db
PASSWORD = "correct-horse-battery"  # conftest's make_user
LOCKED = "Too many failed sign-ins"


class FakeClock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch, settings):
    settings.SIGNIN_MAX_FAILURES = 3
    settings.SIGNIN_LOCKOUT_SECONDS = 600
    fake = FakeClock()
    monkeypatch.setattr(throttle, "clock", fake)
    return fake


def browser(ip: str = "127.0.0.1") -> Client:
    return Client(REMOTE_ADDR=ip)


def sign_in(client: Client, username: str, password: str):
    return client.post("/accounts/login/", {"username": username, "password": password})


def signed_in(response) -> bool:
    return response.status_code == 302 and "_auth_user_id" in response.client.session


def test_failures_lock_the_username_out_even_for_the_right_password(clock, alice):
    client = browser()
    for _ in range(3):
        r = sign_in(client, "alice", "wrong-password")
        assert r.status_code == 200 and "didn't match" in r.content.decode()
    r = sign_in(client, "alice", PASSWORD)
    assert r.status_code == 429
    assert LOCKED in r.content.decode() and "Try again in 10 minutes" in r.content.decode()
    assert r["Retry-After"] == "600"
    assert "_auth_user_id" not in client.session
    # Refused attempts do not lengthen the lock: five minutes on, five minutes remain.
    clock.advance(300)
    for _ in range(5):
        assert sign_in(client, "alice", PASSWORD).status_code == 429
    assert sign_in(client, "alice", PASSWORD)["Retry-After"] == "300"


def test_the_lock_expires_after_the_cool_off(clock, alice):
    client = browser()
    for _ in range(3):
        sign_in(client, "alice", "wrong-password")
    clock.advance(599)
    assert sign_in(client, "alice", PASSWORD).status_code == 429
    clock.advance(2)
    assert signed_in(sign_in(client, "alice", PASSWORD))


def test_another_user_or_address_is_not_affected(clock, alice, bob):
    for _ in range(3):
        sign_in(browser(), "alice", "wrong-password")
    assert sign_in(browser(), "alice", PASSWORD).status_code == 429
    assert signed_in(sign_in(browser(), "bob", PASSWORD))  # same address, another user
    assert signed_in(sign_in(browser("127.0.0.2"), "alice", PASSWORD))  # same user, another address
    assert sign_in(browser(), "ALICE", PASSWORD).status_code == 429  # usernames count case-insensitively


def test_a_right_password_clears_the_failures(clock, alice):
    client = browser()
    for _ in range(2):
        sign_in(client, "alice", "wrong-password")
    assert signed_in(sign_in(client, "alice", PASSWORD))
    client.logout()
    for _ in range(2):
        sign_in(client, "alice", "wrong-password")
    assert signed_in(sign_in(client, "alice", PASSWORD))


def test_one_address_guessing_many_usernames_is_locked_for_all(clock, settings, alice, bob):
    settings.SIGNIN_MAX_FAILURES_PER_IP = 4
    for name in ("carol", "dave", "erin", "frank"):
        assert sign_in(browser(), name, "wrong-password").status_code == 200
    assert sign_in(browser(), "bob", PASSWORD).status_code == 429
    assert signed_in(sign_in(browser("127.0.0.3"), "bob", PASSWORD))


def test_the_django_admin_sign_in_is_guarded_too(clock, make_user):
    make_user("staffer", staff=True)
    client = browser()
    for _ in range(3):
        client.post("/django-admin/login/", {"username": "staffer", "password": "wrong-password"})
    r = client.post("/django-admin/login/?next=/django-admin/", {"username": "staffer", "password": PASSWORD})
    assert r.status_code == 200 and "_auth_user_id" not in client.session
    assert sign_in(client, "staffer", PASSWORD).status_code == 429  # one count for both forms


SIGNUP = {
    "email": "new@example.com",
    "password": "a-long-enough-password",
    "org_name": "New",
}


def sign_up(client: Client, n: int):
    return client.post("/accounts/signup/", {**SIGNUP, "username": f"user{n}", "org_slug": f"org-{n}"})


def test_sign_ups_are_throttled_per_address(clock, settings):
    settings.SIGNUP_MAX_PER_IP = 2
    settings.SIGNUP_WINDOW_SECONDS = 3600
    assert sign_up(browser(), 1).status_code == 302
    assert sign_up(browser(), 2).status_code == 302
    r = sign_up(browser(), 3)
    assert r.status_code == 429 and "Too many sign-ups from your address" in r.content.decode()
    assert r["Retry-After"] == "3600"
    assert sign_up(browser("127.0.0.2"), 4).status_code == 302  # another address
    clock.advance(3601)
    assert sign_up(browser(), 5).status_code == 302


def test_an_unreachable_valkey_does_not_lock_anyone_out(clock, monkeypatch, settings, alice):
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    monkeypatch.setattr(throttle, "_client", None)  # made again from the setting, as in a fresh process
    for _ in range(5):
        sign_in(browser(), "alice", "wrong-password")
    assert signed_in(sign_in(browser(), "alice", PASSWORD))
    assert sign_up(browser(), 9).status_code == 302
