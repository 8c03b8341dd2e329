"""The host table tests resolve remote environment names with (OPENTINKER_EGRESS_RESOLVER, set by
tests/embedded_services.py): no DNS query ever leaves a test. Addresses here are only checked by the egress
policy at submission; nothing connects to them (jobs that do connect use loopback servers)."""

from __future__ import annotations

from opentinker.egress import EgressRefused

HOSTS: dict[str, list[str]] = {
    "env.example": ["93.184.215.14"],  # a public address: the remote environment of API and worker tests
    "loopback.example": ["127.0.0.1"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "private.example": ["10.20.30.40"],
    "rebind.example": ["93.184.215.14", "192.168.0.10"],
}


def resolve(host: str, port: int) -> list[str]:
    try:
        return HOSTS[host]
    except KeyError:
        raise EgressRefused(f"cannot resolve {host} (not in the tests' host table)") from None
