"""Client identity: REMOTE_ADDR or a trusted proxy's X-Forwarded-For, widened to its network."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotas.clientip import client_identity, client_ip, parse_trusted_proxies
from quotas.guards import scope_client_ip

PROXIES = "10.0.0.0/8, 192.168.1.1, fd00::/8"


@pytest.mark.parametrize(
    ("remote", "forwarded", "expected"),
    [
        # Untrusted peer: the header is ignored, whatever it says.
        ("203.0.113.9", "1.2.3.4", "203.0.113.9"),
        ("203.0.113.9", "10.0.0.1, 1.2.3.4", "203.0.113.9"),
        ("2001:db8::9", "1.2.3.4", "2001:db8::9"),
        # Trusted peer: the right-most address that is not a trusted proxy.
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.9.9.9, 192.168.1.1", "198.51.100.1"),
        ("192.168.1.1", "198.51.100.1", "198.51.100.1"),
        ("fd00::1", "2001:db8::1", "2001:db8::1"),
        ("fd00::1", "198.51.100.1, fd00::2", "198.51.100.1"),
        ("10.0.0.2", "[2001:db8::7]:443", "2001:db8::7"),
        ("10.0.0.2", "198.51.100.1:8080", "198.51.100.1"),
        ("::ffff:10.0.0.2", "198.51.100.1", "198.51.100.1"),  # v4-mapped peer
        ("10.0.0.2", "::ffff:198.51.100.1", "198.51.100.1"),
        # Trusted peer and only proxies in the header: the left-most of them.
        ("10.0.0.2", "10.0.0.3, 10.0.0.4", "10.0.0.3"),
        # Garbage stops the walk at the last good address (never an error).
        ("10.0.0.2", "", "10.0.0.2"),
        ("10.0.0.2", "unknown", "10.0.0.2"),
        ("10.0.0.2", "1.2.3", "10.0.0.2"),
        ("10.0.0.2", ",,,", "10.0.0.2"),
        ("10.0.0.2", "[::1]:80", "::1"),
        ("10.0.0.2", "198.51.100.1, garbage", "10.0.0.2"),
        ("10.0.0.2", "garbage, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "1.1.1.1, " * 10_000 + "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "x" * 100_000, "10.0.0.2"),
        ("10.0.0.2", "\x00\xff💥", "10.0.0.2"),
        # A peer that is not an address at all (unix socket, test servers).
        ("", "1.2.3.4", "unknown"),
        ("not-an-ip", "1.2.3.4", "not-an-ip"),
    ],
)
def test_client_ip(remote, forwarded, expected):
    # The walk, address by address: an IPv6 prefix of 128 keeps every address its own client.
    assert client_ip(remote, forwarded, PROXIES, ipv6_prefix=128) == expected


def test_no_trusted_proxies_means_the_peer():
    assert client_ip("10.0.0.2", "198.51.100.1", "") == "10.0.0.2"


def test_malformed_setting_trusts_nobody_mid_request():
    assert client_ip("10.0.0.2", "198.51.100.1", "10.0.0.0/33") == "10.0.0.2"


def test_parse_trusted_proxies():
    networks = parse_trusted_proxies(" 10.0.0.0/8 ,, ::1 ")
    assert networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert parse_trusted_proxies(["10.0.0.0/8", "::1"]) == networks
    assert parse_trusted_proxies("") == ()
    for bad in ("10.0.0.0/33", "proxy.example", "10.0.0.0/8, 1.2.3"):
        with pytest.raises(ValueError, match="is not an IP address or CIDR network"):
            parse_trusted_proxies(bad)
    with pytest.raises(ValueError, match="expected comma-separated CIDRs"):
        parse_trusted_proxies(42)


@settings(max_examples=300, deadline=None)
@given(
    remote=st.one_of(st.ip_addresses().map(str), st.text(max_size=50)),
    forwarded=st.one_of(
        st.text(max_size=200),
        st.lists(
            st.one_of(st.ip_addresses().map(str), st.text(max_size=20), st.just("unknown")),
            max_size=8,
        ).map(", ".join),
    ),
)
def test_garbage_never_raises(remote, forwarded):
    result = client_ip(remote, forwarded, PROXIES)
    assert isinstance(result, str) and result
    try:
        peer = ipaddress.ip_address(remote.strip())
    except ValueError:
        return
    peer = peer.ipv4_mapped or peer if peer.version == 6 else peer
    ipaddress.ip_network(result)  # a trusted peer yields some address or network, never garbage
    networks = parse_trusted_proxies(PROXIES)
    if not any(peer in net for net in networks if net.version == peer.version):
        assert result == client_identity(peer)  # an untrusted peer's header never matters


def test_websocket_scope_uses_the_same_rules(settings):
    settings.QUOTAS_TRUSTED_PROXIES = "10.0.0.0/8"
    scope = {
        "client": ("10.0.0.2", 5555),
        "headers": [(b"x-forwarded-for", b"6.6.6.6, 198.51.100.1")],
    }
    assert scope_client_ip(scope) == "198.51.100.1"
    scope["client"] = ("203.0.113.1", 5555)
    assert scope_client_ip(scope) == "203.0.113.1"
    assert scope_client_ip({"headers": []}) == "unknown"


def test_addresses_of_one_ipv6_64_are_one_client():
    first = client_ip("2001:db8:1:2::1", "", "")
    second = client_ip("2001:db8:1:2:a:b:c:d", "", "")
    assert first == second == "2001:db8:1:2::/64"
    assert client_ip("2001:db8:1:3::1", "", "") == "2001:db8:1:3::/64"  # the next /64
    assert client_ip("[2001:db8:1:2::9]:443", "", "") == "2001:db8:1:2::/64"


def test_ipv6_zone_id_is_ignored():
    assert client_ip("fe80::1%eth0", "", "") == "fe80::/64"
    assert client_ip("fe80::1%eth0", "", "", ipv6_prefix=128) == "fe80::1"
    assert client_ip("[fe80::2%25en0]:80", "", "", ipv6_prefix=128) == "fe80::2"
    # A zone does not hide a trusted proxy either.
    assert client_ip("fd00::1%eth0", "2001:db8:7::5", PROXIES) == "2001:db8:7::/64"


def test_ipv4_stays_one_address_by_default():
    assert client_ip("203.0.113.7", "", "") == "203.0.113.7"
    assert client_ip("203.0.113.8", "", "") == "203.0.113.8"
    assert client_ip("::ffff:203.0.113.7", "", "") == "203.0.113.7"  # v4-mapped is IPv4


def test_explicit_prefixes():
    assert client_ip("2001:db8:1:2::1", "", "", ipv6_prefix=48) == "2001:db8:1::/48"
    assert client_ip("2001:db8:1:ffff::1", "", "", ipv6_prefix=48) == "2001:db8:1::/48"
    assert client_ip("203.0.113.7", "", "", ipv4_prefix=24) == "203.0.113.0/24"
    assert client_ip("::ffff:203.0.113.7", "", "", ipv4_prefix=24) == "203.0.113.0/24"
    assert client_ip("2001:db8::1", "", "", ipv6_prefix=128) == "2001:db8::1"
    assert client_identity("203.0.113.200", ipv4_prefix=24) == "203.0.113.0/24"
    with pytest.raises(ValueError, match="is not an IP address"):
        client_identity("garbage")


def test_prefixes_come_from_the_settings(settings):
    settings.QUOTAS_IPV6_PREFIX = 56
    settings.QUOTAS_IPV4_PREFIX = 16
    assert client_ip("2001:db8:1:2::1", "", "") == "2001:db8:1::/56"
    assert client_ip("203.0.113.7", "", "") == "203.0.0.0/16"


@pytest.mark.parametrize("bad", ["abc", 0, 129, -1, None, True, 64.0])
def test_bad_prefix_setting_falls_back_to_the_defaults_mid_request(settings, bad):
    settings.QUOTAS_IPV6_PREFIX = bad
    settings.QUOTAS_IPV4_PREFIX = bad
    assert client_ip("2001:db8:1:2::1", "", "") == "2001:db8:1:2::/64"
    assert client_ip("203.0.113.7", "", "") == "203.0.113.7"


def test_trusted_proxy_forwarding_one_64_gives_one_client():
    addresses = ("2001:db8:5:6::1", "2001:db8:5:6::2", "2001:db8:5:6:ffff:ffff:ffff:ffff")
    seen = {client_ip("fd00::1", f"198.51.100.1, {a}, fd00::2", PROXIES) for a in addresses}
    assert seen == {"2001:db8:5:6::/64"}
    # Proxies are matched per address, not per /64: a neighbour of a trusted proxy is not
    # one, so its X-Forwarded-For is ignored.
    assert client_ip("2001:db8:5:6::1", "198.51.100.1", "2001:db8:5:6::2") == "2001:db8:5:6::/64"
