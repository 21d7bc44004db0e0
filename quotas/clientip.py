"""The client's IP address: the peer, or what a trusted proxy says in X-Forwarded-For."""

import ipaddress
import logging
from functools import lru_cache

logger = logging.getLogger("quotas.clientip")


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
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address, networks):
    return any(address in net for net in networks if net.version == address.version)


def client_ip(remote_addr, forwarded_for, trusted_proxies):
    """The client's address as a string.

    ``REMOTE_ADDR`` unless that peer is a trusted proxy; then walk ``X-Forwarded-For`` from
    the right and take the first address that is not a trusted proxy. Malformed entries end
    the walk at the last good address: a forged or garbled header never raises.
    """
    peer = _address(remote_addr)
    if peer is None:
        return (remote_addr or "unknown")[:64]
    try:
        networks = parse_trusted_proxies(trusted_proxies) if trusted_proxies else ()
    except ValueError:
        # A malformed setting is reported by the quotas.E002 check; mid-request, trust nobody.
        networks = ()
    if not networks or not _trusted(peer, networks) or not forwarded_for:
        return str(peer)
    client = peer
    for item in reversed(forwarded_for.split(",")[-32:]):
        address = _address(item)
        if address is None:
            break
        client = address
        if not _trusted(address, networks):
            break
    return str(client)
