"""Keyed hashing of secrets (API tokens, invitations): HMAC-SHA256 under the server's peppers."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


def _peppers() -> dict[str, str]:
    # Read at each call, so a test (or a reload) that changes the setting takes effect at once.
    return settings.TOKEN_PEPPERS


def current_pepper_id() -> str:
    """The id of the newest pepper: new secrets are hashed under it."""
    return next(iter(_peppers()))


def secret_hash(secret: str, pepper_id: str | None = None) -> str:
    """HMAC-SHA256 of the secret under one pepper (the newest by default). KeyError for an unknown id."""
    peppers = _peppers()
    pepper = peppers[pepper_id if pepper_id is not None else next(iter(peppers))]
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def secret_hashes(secret: str) -> list[str]:
    """The secret's hash under every live pepper, newest first: for lookups by hash (invitations), where
    no pepper id is known before the row is found."""
    return [secret_hash(secret, pepper_id) for pepper_id in _peppers()]


def secret_matches(secret: str, stored_hash: str, pepper_id: str | None = None) -> bool:
    """Constant-time: the comparison must not leak how many leading characters matched. A pepper that is no
    longer configured matches nothing (that is how removing a pepper retires the tokens hashed under it),
    after the same amount of work."""
    peppers = _peppers()
    if pepper_id is not None and pepper_id not in peppers:
        hmac.compare_digest(secret_hash(secret), "0" * 64)
        return False
    return hmac.compare_digest(secret_hash(secret, pepper_id), stored_hash)


def fernet(label: bytes) -> Fernet:
    """Fernet under a key derived from SECRET_KEY for one use (`label`, versioned): values kept in the
    database or the session are unreadable without the key, and no two uses share one."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(
        settings.SECRET_KEY.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))
