"""Who a client is: its address, widened to the network its addresses share.

The address is the peer, or what a trusted proxy says in X-Forwarded-For; proxies are matched
address by address. Only the final address is widened: one IPv6 subscriber usually holds a
whole /64 and can pick a new address from it for every request, so by default the /64 is the
client (``QUOTAS_IPV6_PREFIX``, ``QUOTAS_IPV4_PREFIX``). Rate limits, concurrent sessions and
spend are all keyed by this identity.
"""

import ipaddress
import logging
from functools import lru_cache

from .conf import default, quota_settings

logger = logging.getLogger("quotas.clientip")

MAX_PREFIX = {4: 32, 6: 128}


def parse_trusted_proxies(value):
    """Parse comma-separated CIDRs (or a list/tuple of them); ValueError names a bad entry."""
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    if value is not None and not isinstance(value, str):
        raise ValueError(f"expected comma-separated CIDRs, got a {type(value).__name__}")
    return _parse_networks(value or "")


@lru_cache(maxsize=32)
def _parse_networks(value):
    networks = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _address(value):
    value = (value or "").strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    if ":" in value:
        # A zone id (fe80::1%eth0) names an interface of the host, not a different client.
        value = value.partition("%")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address, networks):
    return any(address in net for net in networks if net.version == address.version)


def parse_prefix(value, version):
    """``value`` as a prefix length for IP ``version`` (4 or 6); ValueError gives the range."""
    maximum = MAX_PREFIX[version]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"expected a whole number from 1 to {maximum}, got {value!r}")
    return value


def _prefix(value, version):
    name = f"IPV{version}_PREFIX"
    if value is None:
        value = getattr(quota_settings, name)
    try:
        return parse_prefix(value, version)
    except ValueError:
        # A malformed setting is reported by the quotas.E005 check; mid-request, use the default.
        return default(name)


def client_identity(address, *, ipv6_prefix=None, ipv4_prefix=None):
    """The string a client address is counted under: its network, or the bare address.

    ``2001:db8:1:2::7`` -> ``2001:db8:1:2::/64`` with the default IPv6 prefix; an IPv4
    address stays itself at prefix 32 and becomes ``203.0.113.0/24`` at 24. Prefixes default
    to ``QUOTAS_IPV6_PREFIX`` and ``QUOTAS_IPV4_PREFIX``; ValueError for a non-address.
    """
    parsed = _address(str(address))
    if parsed is None:
        raise ValueError(f"{address!r} is not an IP address")
    prefix = _prefix(ipv6_prefix if parsed.version == 6 else ipv4_prefix, parsed.version)
    if prefix == parsed.max_prefixlen:
        return str(parsed)
    return str(ipaddress.ip_network((parsed, prefix), strict=False))


def client_address(remote_addr, forwarded_for, trusted_proxies):
    """The client's own address (an ``ipaddress`` object), or None if the peer is not one.

    ``REMOTE_ADDR`` unless that peer is a trusted proxy; then walk ``X-Forwarded-For`` from
    the right and take the first address that is not a trusted proxy. Malformed entries end
    the walk at the last good address: a forged or garbled header never raises.
    """
    peer = _address(remote_addr)
    if peer is None:
        return None
    try:
        networks = parse_trusted_proxies(trusted_proxies) if trusted_proxies else ()
    except ValueError:
        # A malformed setting is reported by the quotas.E002 check; mid-request, trust nobody.
        networks = ()
    if not networks or not _trusted(peer, networks) or not forwarded_for:
        return peer
    client = peer
    for item in reversed(forwarded_for.split(",")[-32:]):
        address = _address(item)
        if address is None:
            break
        client = address
        if not _trusted(address, networks):
            break
    return client


def client_ip(remote_addr, forwarded_for, trusted_proxies, *, ipv6_prefix=None, ipv4_prefix=None):
    """The client's identity as a string: ``client_address`` widened by ``client_identity``.

    A peer that is not an address at all (a unix socket, a test server) is its own text.
    """
    address = client_address(remote_addr, forwarded_for, trusted_proxies)
    if address is None:
        return (remote_addr or "unknown")[:64]
    return client_identity(address, ipv6_prefix=ipv6_prefix, ipv4_prefix=ipv4_prefix)


_REMEMBERED_CLIENTS = 4096
_REMEMBERED_HEADER_CHARS = 256  # a longer X-Forwarded-For is worked out each time


def configured_client_ip(remote_addr, forwarded_for):
    """``client_ip`` under the ``QUOTAS_*`` settings (trusted proxies, prefixes).

    Requests come again and again from the same few clients: the answers for the last 4096
    (peer, X-Forwarded-For) pairs are remembered, keyed by the settings too. The cache is
    bounded (least recently used out), so a flood of made-up headers evicts, never grows it.
    """
    trusted = quota_settings.TRUSTED_PROXIES
    if isinstance(trusted, list | tuple):
        trusted = tuple(trusted)
    ipv6, ipv4 = quota_settings.IPV6_PREFIX, quota_settings.IPV4_PREFIX
    # Not a whole number: _prefix() reads the setting itself and falls back to the default.
    ipv6 = ipv6 if isinstance(ipv6, int) else None
    ipv4 = ipv4 if isinstance(ipv4, int) else None
    remote_addr, forwarded_for = remote_addr or "", forwarded_for or ""
    if len(forwarded_for) > _REMEMBERED_HEADER_CHARS or len(remote_addr) > 64:
        return client_ip(remote_addr, forwarded_for, trusted, ipv6_prefix=ipv6, ipv4_prefix=ipv4)
    return _remembered_client_ip(remote_addr, forwarded_for, trusted, ipv6, ipv4)


@lru_cache(maxsize=_REMEMBERED_CLIENTS)
def _remembered_client_ip(remote_addr, forwarded_for, trusted, ipv6, ipv4):
    return client_ip(remote_addr, forwarded_for, trusted, ipv6_prefix=ipv6, ipv4_prefix=ipv4)
