"""A short per-process memo of API token authentication (`API_AUTH_CACHE_SECONDS`, README "Running in
production").

Authenticating a token costs two queries, most of a list request's CPU besides the page itself. Within one
process a token seen in the last few seconds is trusted again without them. Safety:

- the key is a digest of the whole token, so only the exact secret that authenticated hits an entry;
- expiry is checked on every hit;
- any write to a token, membership, user or organization in this process forgets every entry, so a revocation
  or a demotion through this process applies to its next request; the other processes apply it when their
  entry ends, within `API_AUTH_CACHE_SECONDS` (queryset `update()` calls send no signal: also within that).

When an entry ends, one query reads the row versions of the token, its user, its organization and the owner's
membership (PostgreSQL's `xmin` and `ctid`: any update or delete of a row gives it new ones, however it was
written, even twice in one transaction): unchanged since the entry was made, the entry is trusted for another
`API_AUTH_CACHE_SECONDS` without the full authentication (two queries and a hash: ~2.8 ms of CPU against
~0.3). The versions are read before the authentication they vouch for, so a change in between is seen at the
next check. A full authentication still runs at least every LAST_USED_RESOLUTION, which keeps `last_used_at`.
"""

from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from portal.models import ApiToken, Membership, Organization
from portal.services.tokens import LAST_USED_RESOLUTION, TOKEN_RE, token_authenticate

MAX_ENTRIES = 10_000  # a bound on memory; filling it simply starts over
# secret digest -> (trusted until, full authentication no later than, token, membership, row versions)
_entries: dict[bytes, tuple[float, float, ApiToken, Membership, tuple | None]] = {}
# Counts forget_all() calls. The production server runs a process's requests on several threads: one that read
# the rows before another thread's revocation cleared the entries must not store what it read after the clear
# (the revocation would wait for the entry's end instead of applying at once in this process).
_generation = 0


def _versions(lookup: str) -> tuple | None:
    """The row versions of the token with this lookup, its user, organization and owner's membership; None
    when there is no such token."""
    token, user = ApiToken._meta.db_table, get_user_model()._meta.db_table
    org, member = Organization._meta.db_table, Membership._meta.db_table
    sql = f"""
        SELECT t.xmin::text, t.ctid::text, u.xmin::text, u.ctid::text, o.xmin::text, o.ctid::text,
               m.xmin::text, m.ctid::text
        FROM "{token}" t JOIN "{user}" u ON u.id = t.user_id JOIN "{org}" o ON o.id = t.organization_id
        LEFT JOIN "{member}" m ON m.organization_id = t.organization_id AND m.user_id = t.user_id
        WHERE t.lookup = %s
    """  # noqa: S608 (table names from the models' metadata; the lookup is a parameter)
    with connection.cursor() as cursor:
        cursor.execute(sql, [lookup])
        row = cursor.fetchone()
    return tuple(row) if row else None


def token_authenticate_cached(raw: str) -> tuple[ApiToken, Membership] | None:
    ttl = settings.API_AUTH_CACHE_SECONDS
    if not ttl:
        return token_authenticate(raw)
    key = hashlib.sha256(raw.encode()).digest()
    generation = _generation  # before anything is read
    now = time.monotonic()
    hit = _entries.get(key)
    fresh: tuple | None = None
    if hit is not None:
        until, full_by, token, membership, versions = hit
        if until <= now and versions is not None:
            fresh = _versions(token.lookup)
            if fresh == versions and now < full_by:
                until = now + ttl  # nothing it was made from has changed: trusted again
                _remember(generation, key, (until, full_by, token, membership, versions))
        if until > now and (token.expires_at is None or token.expires_at > timezone.now()):
            return token, membership
    if fresh is None:
        m = TOKEN_RE.match(raw)
        fresh = _versions(m["lookup"]) if m else None  # before the authentication they vouch for
    found = token_authenticate(raw)
    if found is None:
        _entries.pop(key, None)
        return None
    if len(_entries) >= MAX_ENTRIES:
        _entries.clear()
    _remember(generation, key, (now + ttl, now + LAST_USED_RESOLUTION.total_seconds(), *found, fresh))
    return found


def _remember(generation: int, key: bytes, entry: tuple) -> None:
    _entries[key] = entry
    if _generation != generation:
        # A write in this process forgot the entries since this request read its rows (checked after the
        # store, so a clear between the check and the store cannot be missed).
        _entries.pop(key, None)


def forget_all(**_kwargs: object) -> None:
    global _generation
    _generation += 1
    _entries.clear()


for _model in (ApiToken, Membership, Organization, settings.AUTH_USER_MODEL):
    post_save.connect(forget_all, sender=_model, weak=False, dispatch_uid=f"token_cache.save.{_model}")
    post_delete.connect(forget_all, sender=_model, weak=False, dispatch_uid=f"token_cache.delete.{_model}")
