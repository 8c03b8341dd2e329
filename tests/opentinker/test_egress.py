"""The egress policy as a pure function over resolved addresses: every address class and spelling, with no
network traffic at all (a resolver that answers from a dict; nothing here opens a socket)."""

from __future__ import annotations

import ipaddress

import pytest

from opentinker.egress import (
    AllowEntry,
    Egress,
    EgressPolicy,
    EgressRefused,
    decide,
    parse_allow_list,
    parse_ip,
    parse_ipv4_spelling,
    split_url,
)

PUBLIC = "93.184.215.14"
PUBLIC6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
NONE = EgressPolicy()


def refused(url_or_addr: str, policy: EgressPolicy = NONE, *, host: str = "env.example", scheme="https"):
    with pytest.raises(EgressRefused) as e:
        decide(scheme, host, 443, [url_or_addr], policy)
    return str(e.value)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),  # broadcast (in 240.0.0.0/4)
        ("192.0.2.1", "private"),  # documentation (TEST-NET-1)
        ("198.18.0.1", "private"),  # benchmarking
        ("2001:db8::1", "private"),  # documentation
        ("0.1.2.3", "private"),  # "this network"
        # IPv4 inside IPv6: mapped, NAT64 (well-known and local-use prefixes), 6to4, IPv4-compatible
        ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
        ("::ffff:7f00:1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
        ("::ffff:10.0.0.1", "private (IPv4 10.0.0.1 inside IPv6)"),
        ("64:ff9b::7f00:1", "loopback (IPv4 127.0.0.1"),
        ("64:ff9b::a00:1", "private (IPv4 10.0.0.1"),
        ("64:ff9b:1::c0a8:1", "private (IPv4 192.168.0.1"),
        ("2002:7f00:1::", "loopback (IPv4 127.0.0.1"),
        ("2002:a9fe:a9fe::", "169.254.169.254"),
        ("::127.0.0.1", "loopback (IPv4 127.0.0.1"),
    ],
)
def test_every_non_public_address_class_is_refused_by_name(address, reason):
    assert reason in refused(address)


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254", "0.0.0.0", "::"],  # noqa: S104
)
def test_metadata_and_unspecified_are_never_allowed_even_for_an_allow_listed_name(address):
    policy = EgressPolicy(parse_allow_list(["env.example", "10.0.0.0/8"]))
    assert "never allowed" in refused(address, policy)


def test_public_addresses_pass_over_https_only():
    decide("https", "env.example", 443, [PUBLIC, PUBLIC6], NONE)
    decide("wss", "env.example", 443, [f"::ffff:{PUBLIC}"], NONE)  # mapped public: public
    assert "use https://" in refused(PUBLIC, scheme="http")
    assert "use https://" in refused(PUBLIC, scheme="ws")


def test_one_bad_address_among_the_answers_refuses_the_host():
    with pytest.raises(EgressRefused, match=r"resolves to 10\.0\.0\.7"):
        decide("https", "env.example", 443, [PUBLIC, "10.0.0.7"], NONE)
    with pytest.raises(EgressRefused, match="did not resolve"):
        decide("https", "env.example", 443, [], NONE)


def test_the_platforms_own_public_addresses_are_refused():
    policy = EgressPolicy(platform=(ipaddress.ip_network("93.184.215.0/24"),))
    assert "platform's own" in refused(PUBLIC, policy)
    assert "platform's own" in refused(f"::ffff:{PUBLIC}", policy)
    decide("https", "env.example", 443, ["93.184.216.1"], policy)


def test_the_allow_list_admits_private_servers_by_name_cidr_and_port():
    policy = EgressPolicy(parse_allow_list("10.0.0.0/8, env.internal:8000 [fd00::/8]:9000 127.0.0.1:8931"))
    decide("https", "x", 443, ["10.2.3.4"], policy)
    decide("http", "x", 80, ["10.2.3.4"], policy)  # plain http to an allow-listed server
    decide("http", "env.internal", 8000, ["192.168.7.7"], policy)
    decide("https", "x", 9000, ["fd00::5"], policy)
    decide("http", "127.0.0.1", 8931, ["127.0.0.1"], policy)
    decide("http", "x", 80, ["::ffff:10.9.9.9"], policy)  # the mapped form of an allowed address
    for host, port, addr in [
        ("env.internal", 8001, "192.168.7.7"),  # another port
        ("x", 9001, "fd00::5"),
        ("127.0.0.1", 8932, "127.0.0.1"),
        ("x", 443, "192.168.0.1"),  # not in the list
    ]:
        with pytest.raises(EgressRefused):
            decide("https", host, port, [addr], policy)


@pytest.mark.parametrize(
    "bad", ["", "http://x", "a b", "10.0.0.0/33", "x:y", "x:70000", "[::1]:z", "under_score!", "0x7f000001"]
)
def test_bad_allow_list_entries_are_errors(bad):
    with pytest.raises(ValueError):
        AllowEntry.parse(bad)


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0", "0.0.0.0"),  # noqa: S104
        ("0xa9fea9fe", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("10.0x10.1", "10.16.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
    ],
)
def test_ipv4_spellings_are_read_as_resolvers_read_them(spelling, address):
    assert str(parse_ipv4_spelling(spelling)) == address


@pytest.mark.parametrize(
    "name", ["env.example", "1.2.3.4.5", "256.0.0.1", "0x", "08.0.0.1", "1e3", "4294967296"]
)
def test_names_are_not_mistaken_for_addresses(name):
    assert parse_ipv4_spelling(name) is None or name == "0x"


def test_ipv6_literals_and_zone_ids():
    assert str(parse_ip("[::ffff:127.0.0.1]")) == "::ffff:7f00:1"
    with pytest.raises(EgressRefused, match="zone id"):
        parse_ip("fe80::1%eth0")


class Hosts:
    """A resolver the test controls: answers from a dict and counts its calls; never touches DNS."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.calls = table, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.table:
            raise EgressRefused(f"cannot resolve {host}")
        return self.table[host]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8931",
        "https://127.0.0.1/",
        "https://2130706433/",
        "https://0x7f000001/",
        "https://0177.0.0.1/",
        "https://127.1/",
        "https://[::1]/",
        "https://[::ffff:127.0.0.1]/",
        "https://[::ffff:a9fe:a9fe]/",
        "https://169.254.169.254/latest/meta-data/",
        "https://0xa9fea9fe/",
        "https://10.0.0.1/",
        "https://[fd00::1]/",
        "https://100.64.1.1/",
        "https://loopback.example/",
        "https://LOOPBACK.example./",
        "https://metadata.example/",
        "https://rebind.example/",
        "ftp://env.example/",
        "file:///etc/passwd",
        "https://user:pw@env.example/",
        "https://",
        "https://env.example:99999/",
        "https://nowhere.example/",
    ],
)
def test_urls_are_checked_after_resolution_without_any_network(url):
    hosts = Hosts(
        {
            "loopback.example": ["127.0.0.1"],
            "metadata.example": ["169.254.169.254"],
            "rebind.example": [PUBLIC, "10.0.0.1"],
            "env.example": [PUBLIC],
        }
    )
    with pytest.raises(EgressRefused):
        Egress(NONE, hosts).check(url)


def test_a_checked_url_pins_its_addresses_and_the_connection_uses_them():
    hosts = Hosts({"env.example": [PUBLIC]})
    egress = Egress(NONE, hosts)
    target = egress.check("https://ENV.example/x")
    assert (target.host, target.port, target.addresses) == ("env.example", 443, (PUBLIC,))
    hosts.table["env.example"] = ["127.0.0.1"]  # DNS rebinding after the check
    assert egress.pinned("env.example", 443) == (PUBLIC,)  # what was checked, not a second answer
    assert hosts.calls == [("env.example", 443)]
    # A host never checked is checked when a connection asks for it (and refused here).
    with pytest.raises(EgressRefused, match="loopback"):
        egress.pinned("127.0.0.1", 443)
    hosts.table["other.example"] = ["10.0.0.1"]
    with pytest.raises(EgressRefused, match="private"):
        egress.pinned("other.example", 443)


def test_split_url_defaults_ports_by_scheme():
    assert split_url("https://a.example") == ("https", "a.example", 443)
    assert split_url("http://a.example") == ("http", "a.example", 80)
    assert split_url("wss://a.example:8443/ws") == ("wss", "a.example", 8443)
    assert split_url("https://[::1]:9/") == ("https", "::1", 9)


def test_policy_from_the_runtime_environment():
    p = EgressPolicy.from_env(
        {"OPENTINKER_EGRESS_ALLOW": "127.0.0.1:8000,10.0.0.0/8", "OPENTINKER_EGRESS_DENY": "1.2.3.4"}
    )
    assert [str(e) for e in p.allow] == ["127.0.0.1/32:8000", "10.0.0.0/8"]
    assert [str(n) for n in p.platform] == ["1.2.3.4/32"]
    assert EgressPolicy.from_env({}) == EgressPolicy()
