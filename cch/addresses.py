"""Which host names and addresses are this machine's own (loopback)."""

from __future__ import annotations

from ipaddress import ip_address


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761) or a loopback address (IPv4-mapped too)."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ip_address(name.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)
