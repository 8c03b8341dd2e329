"""Optional error reporting to Sentry (or a Sentry-compatible server) when SENTRY_DSN is set.

sentry-sdk is not a dependency (most installs do not use it): it is imported only when a DSN is configured,
and a DSN without the package stops the start with the command to install it, rather than dropping every
error report silently. Its Django and Celery integrations turn on by themselves when those are installed.
Personal data (user names, addresses, cookies, bodies) is not sent.
"""

from __future__ import annotations

import importlib

from django.core.exceptions import ImproperlyConfigured


def sentry_init(dsn: str, *, environment: str, traces_sample_rate: float = 0.0) -> bool:
    """Start reporting to ``dsn``; False (nothing done) when it is empty."""
    if not dsn:
        return False
    try:
        sentry_sdk = importlib.import_module("sentry_sdk")
    except ImportError:
        raise ImproperlyConfigured(
            "SENTRY_DSN is set but sentry-sdk is not installed: pip install sentry-sdk (or unset SENTRY_DSN)"
        ) from None
    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        send_default_pii=False,
        traces_sample_rate=traces_sample_rate,
    )
    return True
