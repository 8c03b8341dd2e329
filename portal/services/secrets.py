"""Keyed hashing of secrets (API tokens, invitations): HMAC-SHA256 with the server's pepper."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


def secret_hash(secret: str) -> str:
    return hmac.new(settings.TOKEN_PEPPER.encode(), secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    # Constant-time: the comparison must not leak how many leading characters matched.
    return hmac.compare_digest(secret_hash(secret), stored_hash)


def fernet(label: bytes) -> Fernet:
    """Fernet under a key derived from SECRET_KEY for one use (`label`, versioned): values kept in the
    database or the session are unreadable without the key, and no two uses share one."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(
        settings.SECRET_KEY.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))
