"""Egress policy for remote environments: which servers a job's runtime may connect to.

A job's `environment.ref` may be the URL of a tenant's environment server, and the runtime connects to it from
inside the platform's network. Without a policy a tenant could point it at internal services (the Ray
dashboard's job API, cloud metadata, PostgreSQL, Valkey). The rule, checked at submission and again by the
runtime before every connection (each redirect hop included):

- the URL is `https://` (`wss://`); plain `http://` only for an allow-listed host;
- every address the host resolves to is globally routable: loopback, private (RFC 1918, ULA), link-local
  (including the 169.254.169.254 metadata service), shared/CGNAT (100.64/10), multicast, unspecified,
  reserved, documentation and benchmarking ranges are refused, and so are the platform's own addresses;
  IPv4 embedded in IPv6 (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4, compatible) is judged as the
  IPv4 it carries; host spellings that resolvers read as IPv4 (decimal `2130706433`, hex `0x7f000001`,
  octal `0177.0.0.1`, short `127.1`) are parsed as such;
- an allow-list that platform admins set (host names, addresses or CIDRs, each optionally with `:port`)
  admits private environment servers (and plain http to them).

`decide()` is a pure function over already resolved addresses (tested for every class and spelling with no
network traffic); `Egress` adds a resolver (injectable) and remembers the addresses it checked so that the
connection goes to exactly those (no second resolution between check and connect).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

ALLOW_VAR = "OPENTINKER_EGRESS_ALLOW"  # the runtime's allow-list (the launcher sets it: global + org + pool)
DENY_VAR = "OPENTINKER_EGRESS_DENY"  # the platform's own addresses/CIDRs (refused even if public)

METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}
SECURE = {"https", "wss"}


class EgressRefused(ValueError):
    """The policy refuses this URL; the message says why (and names the address class)."""


# ---- host spellings ---------------------------------------------------------------------------------------


def _inet_aton_part(p: str) -> int | None:
    try:
        if p[:2].lower() == "0x":
            return int(p[2:], 16) if p[2:] else 0
        if len(p) > 1 and p[0] == "0":
            return int(p[1:], 8)
        return int(p, 10) if p.isdigit() else None
    except ValueError:
        return None


def parse_ipv4_spelling(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address that inet_aton-style parsers (libc, browsers, curl) read from `host`, or None:
    `127.0.0.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`, `127.0.1`, `0x7f.1`."""
    parts = host.rstrip(".").split(".") if host else []
    if not 1 <= len(parts) <= 4 or any(not p or not p.isascii() for p in parts):
        return None
    nums = [_inet_aton_part(p) for p in parts]
    if any(n is None for n in nums):
        return None
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(parts)):  # type: ignore[operator]
        return None
    value = 0
    for n in head:
        value = value * 256 + n  # type: ignore[operator]
    value = value * 256 ** (5 - len(parts)) + last  # type: ignore[operator]
    return ipaddress.IPv4Address(value)


def parse_ip(host: str) -> IPAddress | None:
    """`host` as an address if it is one in any spelling (IPv6 with or without brackets), else None."""
    h = host.strip("[]")
    if "%" in h:  # a zone id (fe80::1%eth0): link-local by construction
        raise EgressRefused(f"address {host!r} has a zone id")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        return parse_ipv4_spelling(h)


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, IPv4-compatible), if any."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in NAT64 or addr in NAT64_LOCAL:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if int(addr) >> 32 == 0 and int(addr) > 1:  # ::a.b.c.d (deprecated IPv4-compatible)
        return ipaddress.IPv4Address(int(addr))
    return None


def address_class(addr: IPAddress) -> str | None:
    """Why `addr` is not a public internet address (a short name), or None if it is."""
    inner = embedded_ipv4(addr)
    if inner is not None:
        reason = address_class(inner)
        return f"{reason} (IPv4 {inner} inside IPv6)" if reason else None
    if addr in METADATA:
        return "cloud metadata"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, ipaddress.IPv4Address) and addr in CGNAT:
        return "shared address space (CGNAT)"
    if addr.is_reserved:
        return "reserved"
    if addr.is_private:
        return "private"
    if not addr.is_global:
        return "not globally routable"
    return None


# ---- the allow-list ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowEntry:
    """A host name, an address or a CIDR, with an optional port (None: any port)."""

    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        t = text.strip()
        if not t or any(c.isspace() for c in t) or "://" in t:
            raise ValueError(f"allow-list entry {text!r}: use host, address or CIDR, with optional :port")
        port: int | None = None
        if t.startswith("["):  # [v6] or [v6]:port or [v6/len]:port
            inner, _, rest = t[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"allow-list entry {text!r}: bad port")
                port = int(rest[1:])
            t = inner
        elif t.count(":") == 1:
            t, _, p = t.partition(":")
            if not p.isdigit():
                raise ValueError(f"allow-list entry {text!r}: bad port")
            port = int(p)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"allow-list entry {text!r}: port out of range")
        try:
            return cls(network=ipaddress.ip_network(t, strict=False), port=port)
        except ValueError:
            pass
        name = t.rstrip(".").lower()
        if not name or not all(c.isalnum() or c in "-._" for c in name) or parse_ipv4_spelling(name):
            raise ValueError(f"allow-list entry {text!r} is not a host name, address or CIDR")
        return cls(host=name, port=port)

    def matches_host(self, host: str, port: int) -> bool:
        return self.host is not None and self.host == host and self.port in (None, port)

    def matches_address(self, addr: IPAddress, port: int) -> bool:
        if self.network is None or self.port not in (None, port):
            return False
        inner = embedded_ipv4(addr)
        return addr in self.network or (inner is not None and inner in self.network)

    def __str__(self) -> str:
        base = self.host if self.host is not None else str(self.network)
        if self.port is None:
            return base
        return f"[{base}]:{self.port}" if ":" in base else f"{base}:{self.port}"


def parse_allow_list(entries: Iterable[str] | str | None) -> tuple[AllowEntry, ...]:
    """Entries as a list, or one string separated by commas or whitespace."""
    if entries is None:
        return ()
    if isinstance(entries, str):
        entries = entries.replace(",", " ").split()
    return tuple(AllowEntry.parse(e) for e in entries if str(e).strip())


def parse_scoped_allow_lists(raw: object) -> dict[str, list[str]]:
    """The platform's allow-lists by scope, `{"*"|"org:<slug>"|"pool:<name>": [entry, ...]}`, validated
    (a bad scope or entry raises ValueError saying which)."""
    if not isinstance(raw, dict):
        raise ValueError('egress allow-lists must be a JSON object {"*"|"org:<slug>"|"pool:<name>": [...]}')
    out: dict[str, list[str]] = {}
    for scope, entries in raw.items():
        if not isinstance(scope, str) or (scope != "*" and not scope.startswith(("org:", "pool:"))):
            raise ValueError(f"egress allow-list: unknown scope {scope!r} (use *, org:<slug>, pool:<name>)")
        items = [entries] if isinstance(entries, str) else entries
        if not isinstance(items, list) or not all(isinstance(e, str) for e in items):
            raise ValueError(f"egress allow-list {scope!r}: a list of strings")
        parse_allow_list(items)
        out[scope] = list(items)
    return out


def parse_networks(entries: Iterable[str] | str | None) -> tuple[IPNetwork, ...]:
    if entries is None:
        return ()
    if isinstance(entries, str):
        entries = entries.replace(",", " ").split()
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries if str(e).strip())


@dataclass(frozen=True)
class EgressPolicy:
    allow: tuple[AllowEntry, ...] = ()
    platform: tuple[IPNetwork, ...] = ()  # the platform's own addresses: refused unless allow-listed

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> EgressPolicy:
        import os

        env = os.environ if environ is None else environ
        return cls(parse_allow_list(env.get(ALLOW_VAR)), parse_networks(env.get(DENY_VAR)))


@dataclass(frozen=True)
class Target:
    """A URL the policy admitted, with the addresses that were checked (connect to these only)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s)/ws(s) URL; raises EgressRefused for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise EgressRefused(f"not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise EgressRefused(f"scheme {scheme or '(none)'!r} is not allowed: use https://")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise EgressRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise EgressRefused("credentials in the URL are not allowed (use an environment secret)")
    return scheme, host, port or DEFAULT_PORTS[scheme]


def decide(
    scheme: str, host: str, port: int, addresses: Sequence[str | IPAddress], policy: EgressPolicy
) -> None:
    """The policy as a pure function: raise EgressRefused (saying why) unless a connection to `host:port`
    at every one of `addresses` (what `host` resolved to) over `scheme` is allowed."""
    if not addresses:
        raise EgressRefused(f"{host} did not resolve to any address")
    host_listed = any(e.matches_host(host, port) for e in policy.allow)
    for a in addresses:
        addr = ipaddress.ip_address(a.split("%", 1)[0]) if isinstance(a, str) else a
        plain = embedded_ipv4(addr) or addr
        cidr_listed = any(e.matches_address(addr, port) for e in policy.allow)
        if plain.is_unspecified or (plain in METADATA and not cidr_listed):
            # Never through a host name: a name an admin trusts must not lead to the metadata service.
            raise EgressRefused(f"{host} resolves to {addr} ({address_class(addr)}), which is never allowed")
        if host_listed or cidr_listed:
            continue
        if scheme not in SECURE:
            raise EgressRefused(f"plain {scheme}:// is only allowed to allow-listed hosts: use https://")
        reason = address_class(addr)
        if reason is None and any(addr in n or plain in n for n in policy.platform):
            reason = "platform's own"
        if reason is not None:
            where = host if host == str(addr) else f"{host} resolves to {addr}"
            raise EgressRefused(
                f"{where}: a {reason} address is not allowed (a platform admin can allow-list a private "
                "environment server)"
            )


def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's resolver (getaddrinfo): every address, IPv4 and IPv6."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise EgressRefused(f"cannot resolve {host}: {e.strerror or e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass
class Egress:
    """The policy with a resolver: `check(url)` resolves once, decides, and remembers the checked
    addresses; `pinned(host, port)` hands them to the connection (no second resolution)."""

    policy: EgressPolicy = field(default_factory=EgressPolicy)
    resolver: Resolver = system_resolver
    _pins: dict[tuple[str, int], tuple[str, ...]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self, url: str) -> Target:
        scheme, host, port = split_url(url)
        literal = parse_ip(host)
        if literal is not None:
            addresses: tuple[str, ...] = (str(literal),)
        else:
            try:
                addresses = tuple(str(a) for a in self.resolver(host, port))
            except EgressRefused:
                raise
            except Exception as e:
                raise EgressRefused(f"cannot resolve {host}: {e}") from None
        decide(scheme, host, port, addresses, self.policy)
        with self._lock:
            self._pins[(host, port)] = addresses
        return Target(url, scheme, host, port, addresses)

    def pinned(self, host: str, port: int) -> tuple[str, ...]:
        """The addresses checked for `host:port`; a host never checked is checked now (and refused if the
        policy says so), so nothing connects around the policy."""
        key = (host.rstrip(".").lower(), port)
        with self._lock:
            found = self._pins.get(key)
        if found is not None:
            return found
        literal = parse_ip(key[0])
        url = f"https://{'[' + key[0] + ']' if literal and literal.version == 6 else key[0]}:{port}/"
        return self.check(url).addresses
