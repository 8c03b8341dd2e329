"""A short per-process memo of API token authentication (`API_AUTH_CACHE_SECONDS`, README "Running in
production").

Authenticating a token costs two queries, most of a list request's CPU besides the page itself. Within one
process a token seen in the last few seconds is trusted again without them. Safety:

- the key is a digest of the whole token, so only the exact secret that authenticated hits an entry;
- expiry is checked on every hit;
- any write to a token, membership, user or organization in this process forgets every entry, so a revocation
  or a demotion through this process applies to its next request; the other processes apply it when their
  entry ends, within `API_AUTH_CACHE_SECONDS` (queryset `update()` calls send no signal: also within that).
"""

from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from portal.models import ApiToken, Membership, Organization
from portal.services.tokens import token_authenticate

MAX_ENTRIES = 10_000  # a bound on memory; filling it simply starts over
_entries: dict[bytes, tuple[float, ApiToken, Membership]] = {}


def token_authenticate_cached(raw: str) -> tuple[ApiToken, Membership] | None:
    ttl = settings.API_AUTH_CACHE_SECONDS
    if not ttl:
        return token_authenticate(raw)
    key = hashlib.sha256(raw.encode()).digest()
    now = time.monotonic()
    hit = _entries.get(key)
    if hit is not None and hit[0] > now:
        _until, token, membership = hit
        if token.expires_at is None or token.expires_at > timezone.now():
            return token, membership
    found = token_authenticate(raw)
    if found is None:
        _entries.pop(key, None)
        return None
    if len(_entries) >= MAX_ENTRIES:
        _entries.clear()
    _entries[key] = (now + ttl, *found)
    return found


def forget_all(**_kwargs: object) -> None:
    _entries.clear()


for _model in (ApiToken, Membership, Organization, settings.AUTH_USER_MODEL):
    post_save.connect(forget_all, sender=_model, weak=False, dispatch_uid=f"token_cache.save.{_model}")
    post_delete.connect(forget_all, sender=_model, weak=False, dispatch_uid=f"token_cache.delete.{_model}")
