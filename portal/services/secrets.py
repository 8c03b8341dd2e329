"""Keyed hashing of secrets (API tokens, invitations): HMAC-SHA256 with the server's pepper."""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings


def secret_hash(secret: str) -> str:
    return hmac.new(settings.TOKEN_PEPPER.encode(), secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    # Constant-time: the comparison must not leak how many leading characters matched.
    return hmac.compare_digest(secret_hash(secret), stored_hash)
