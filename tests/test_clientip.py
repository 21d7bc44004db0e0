"""Client address selection: REMOTE_ADDR, or X-Forwarded-For when a trusted proxy sends it."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotas.clientip import client_ip, parse_trusted_proxies
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
    assert client_ip(remote, forwarded, PROXIES) == expected


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
    ipaddress.ip_address(result)  # a trusted peer yields some address, never garbage
    networks = parse_trusted_proxies(PROXIES)
    if not any(peer in net for net in networks if net.version == peer.version):
        assert result == str(peer)  # an untrusted peer's header never matters


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
