"""Writing the audit log (portal.models.audit).

The services that make a security-relevant change call ``audit_record`` inside their own transaction. Who
acted is the user the service was given (``by``) or, for services that take none (pools), the request's user;
the API token, the client's address and user agent come from the request being served, which
``portal.middleware.AuditContextMiddleware`` makes known for the length of the request. Work done outside a
request (Celery, management commands) is recorded as the system's, with no address.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.db import models

from portal.models import AuditEntry, Organization

_request: ContextVar[Any] = ContextVar("opentinker_audit_request", default=None)
_UNSET: Any = object()
MAX_USER_AGENT = 300


@contextlib.contextmanager
def audit_request(request) -> Iterator[None]:
    """Make `request` the origin of the audit entries written while the block runs."""
    token = _request.set(request)
    try:
        yield
    finally:
        _request.reset(token)


def client_ip(request) -> str | None:
    """The client's address. Behind ``TRUSTED_PROXIES`` reverse proxies (each appending to
    X-Forwarded-For), the address the outermost trusted proxy saw; what is further left is the client's say.
    """
    if request is None:
        return None
    hops = settings.TRUSTED_PROXIES
    candidate = request.META.get("REMOTE_ADDR", "")
    if hops > 0:
        forwarded = [a.strip() for a in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
        if len(forwarded) >= hops:
            candidate = forwarded[-hops]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


def _request_token(request, user) -> Any:
    # DRF's token authentication leaves `auth` on the Django request: api.tenancy.TokenAuth (read by
    # attribute, the domain does not import the API).
    auth = getattr(request, "auth", None)
    token = getattr(auth, "token", None)
    if token is not None and user is not None and token.user_id == user.pk:
        return token
    return None


def _describe(target: Any) -> tuple[str, str, str]:
    if isinstance(target, models.Model):
        return target._meta.model_name, str(target.pk), str(target)[:200]
    kind, ident, label = target  # (type, id, label) for things that are not rows
    return str(kind), str(ident)[:100], str(label)[:200]


def audit_record(
    action: str,
    *,
    organization: Organization | None,
    target: Any,
    user: Any = _UNSET,
    details: dict | None = None,
) -> AuditEntry:
    """Append one entry. `user`: who acted (None for the system); by default the request's user."""
    request = _request.get()
    if user is _UNSET:
        request_user = getattr(request, "user", None)
        user = request_user if request_user is not None and request_user.is_authenticated else None
    token = _request_token(request, user) if request is not None else None
    if user is None:
        label = "system"
    else:
        label = user.get_username()
        if token is not None:
            label = f"{label} (token {token.name}, otk_{token.lookup}_…)"
    target_type, target_id, target_label = _describe(target)
    return AuditEntry.objects.create(
        organization=organization,
        actor_user=user,
        actor_token=token,
        actor_label=label[:200],
        action=str(action),
        target_type=target_type,
        target_id=target_id,
        target_label=target_label,
        ip=client_ip(request),
        user_agent=(request.META.get("HTTP_USER_AGENT", "") if request is not None else "")[:MAX_USER_AGENT],
        details=details or {},
    )
