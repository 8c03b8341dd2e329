"""Model-server tokens: what a model server authenticates with when it writes outcomes to the Tinker ingest.

``otm_<base model, base64url>.<expiry unix seconds>.<signature>``: stateless and signed like job tokens
(portal/services/job_tokens.py) with a key of its own derived from the token pepper. A token speaks for the
model server of ONE base model: it may complete only futures of models on that base. User tokens are never
accepted there, and these tokens nowhere else. In the platform's domain (not api/) because the drivers hand
one to a model server they start (portal/services/model_servers.py); an operator starting one by hand mints
one with `manage.py tinker_server_token`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time

from django.conf import settings

PREFIX = "otm_"
MAX_LENGTH = 400
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
# A token cannot be revoked (only the pepper's rotation voids it, with every other token): it must expire.
MAX_TTL_DAYS = 90
_FORMAT = re.compile(r"otm_(?P<base>[A-Za-z0-9_-]{1,300})\.(?P<expiry>\d{1,12})\.(?P<sig>[A-Za-z0-9_-]{43})")


def _sign(base: str, expiry: int, pepper: str) -> str:
    key = hmac.new(pepper.encode(), b"opentinker model server token v1", hashlib.sha256).digest()
    digest = hmac.new(key, f"{base}.{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def model_server_token_issue(base_model: str, ttl: int = DEFAULT_TTL_SECONDS) -> str:
    base = base64.urlsafe_b64encode(base_model.encode()).rstrip(b"=").decode()
    expiry = int(time.time()) + int(ttl)
    return f"{PREFIX}{base}.{expiry}.{_sign(base, expiry, settings.TOKEN_PEPPER)}"


def model_server_token_verify(raw: str) -> str | None:
    """The base model the token speaks for, or None if it is malformed, forged or expired."""
    if not isinstance(raw, str) or len(raw) > MAX_LENGTH:
        return None
    m = _FORMAT.fullmatch(raw)
    if m is None:
        return None
    base, expiry = m["base"], int(m["expiry"])
    peppers = list(settings.TOKEN_PEPPERS.values())
    if not any([hmac.compare_digest(_sign(base, expiry, p), m["sig"]) for p in peppers]):
        return None
    if expiry <= time.time():
        return None
    try:
        return base64.urlsafe_b64decode(base + "=" * (-len(base) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
