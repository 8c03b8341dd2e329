"""Egress policy for remote environments, platform side: the allow-lists platform admins set, the check at
submission, and what the runtime gets to check again at connect time (opentinker.egress holds the rule).

Settings (from the environment, see README "Remote environments"):

- ``OPENTINKER_EGRESS_ALLOW``: JSON ``{"*": [...], "org:<slug>": [...], "pool:<name>": [...]}``, entries a
  host name, address or CIDR with an optional ``:port`` (``10.0.0.0/8``, ``env.internal:8000``). ``*``
  applies to every job, ``org:`` to one organization's jobs, ``pool:`` to jobs placed on that pool. Only
  platform admins (who deploy it) set it; a tenant cannot.
- ``OPENTINKER_EGRESS_PLATFORM``: the platform's own addresses or CIDRs (comma separated), refused even
  where they are public. This machine's interface addresses are always among them.
- ``OPENTINKER_EGRESS_RESOLVER``: dotted path of a resolver ``(host, port) -> [address, ...]``; default the
  system's. Tests inject one that answers without DNS.
"""

from __future__ import annotations

import functools
import ipaddress

from django.conf import settings
from django.utils.module_loading import import_string

from opentinker.egress import (
    ALLOW_VAR,
    DENY_VAR,
    Egress,
    EgressPolicy,
    EgressRefused,
    parse_allow_list,
    parse_networks,
    parse_scoped_allow_lists,
    system_resolver,
)
from portal.errors import DomainError

FIELD = "environment.ref"


def allow_lists() -> dict[str, list[str]]:
    """The configured allow-lists by scope, validated (settings validate them at start too)."""
    return parse_scoped_allow_lists(settings.OPENTINKER_EGRESS_ALLOW)


def allow_entries(organization_slug: str, pool: str | None) -> list[str]:
    lists = allow_lists()
    entries = list(lists.get("*", [])) + list(lists.get(f"org:{organization_slug}", []))
    if pool:
        entries += lists.get(f"pool:{pool}", [])
    return list(dict.fromkeys(entries))


@functools.cache
def _interface_addresses() -> tuple[str, ...]:
    """This machine's own addresses (no traffic: read from the interfaces)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return ()
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                found.append(str(ipaddress.ip_address(a.address.split("%", 1)[0])))
            except ValueError:
                continue  # MAC addresses and the like
    return tuple(dict.fromkeys(found))


def platform_networks() -> list[str]:
    configured = settings.OPENTINKER_EGRESS_PLATFORM
    if isinstance(configured, str):
        configured = configured.replace(",", " ").split()
    parse_networks(configured)  # validates
    return [*configured, *_interface_addresses()]


def egress_policy(organization_slug: str, pool: str | None) -> EgressPolicy:
    return EgressPolicy(
        parse_allow_list(allow_entries(organization_slug, pool)), parse_networks(platform_networks())
    )


def resolver():
    path = settings.OPENTINKER_EGRESS_RESOLVER
    return import_string(path) if path else system_resolver


def egress_check(url: str, *, organization_slug: str, pool: str | None) -> None:
    """At submission: a 400 naming environment.ref unless the policy admits `url` for this organization
    (and the pool the job names, if any)."""
    try:
        Egress(egress_policy(organization_slug, pool), resolver()).check(url)
    except EgressRefused as e:
        raise DomainError(f"remote environment refused by the egress policy: {e}", field=FIELD) from None


def runtime_egress_env(organization_slug: str, pool: str | None) -> dict[str, str]:
    """The runtime's copy of the policy for one job on one pool (it checks again at connect time)."""
    return {
        ALLOW_VAR: ",".join(allow_entries(organization_slug, pool)),
        DENY_VAR: ",".join(platform_networks()),
    }
