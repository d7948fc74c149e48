"""Which provider-supplied URLs the portal may fetch.

A provider chooses its cluster's ``jobs_url``, and the portal fetches it (the Ray
cross-check, every heartbeat interval). Fetched blindly, that is a way into the
control plane's own network: its loopback services, the cloud metadata address,
private hosts. So a provider URL is fetched only when every address its host
resolves to is a public one, or lies in a network the admin allowed
(``GPUPORTAL_PROVIDER_NETWORKS_ALLOWED``). The house node, which the control
plane itself runs on 127.0.0.1, is trusted.

The check resolves the name when the URL is registered and again before each
fetch, so a name that later points inside is caught at the next fetch.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


def parse_networks(text: str) -> list[Network]:
    """Comma-separated CIDRs (``10.0.0.0/8, fd00::/8``) as networks; ValueError if not."""
    out: list[Network] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not a network such as 10.0.0.0/8") from None
    return out


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def _public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_loopback
        and not address.is_link_local
        and not address.is_private
        and not address.is_reserved
        and not address.is_unspecified
    )


def refusal(url: str, allowed: Sequence[Network] = (), resolver: Resolver = resolve) -> str | None:
    """Why the portal must not fetch ``url`` from a provider, or None when it may."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{url[:80]!r} is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url[:80]!r} is not an http(s) URL with a host"
    host = parts.hostname
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolver(host, port)]
        except (OSError, UnicodeError, ValueError) as exc:
            return f"the host {host[:80]!r} does not resolve ({type(exc).__name__})"
        if not addresses:
            return f"the host {host[:80]!r} does not resolve"
    for address in addresses:
        if any(address in net for net in allowed):
            continue
        if not _public(address):
            return (
                f"the host {host[:80]!r} is at {address}, which is not a public address "
                "(loopback, private, link-local and other special networks are refused "
                "unless the admin allows them in GPUPORTAL_PROVIDER_NETWORKS_ALLOWED)"
            )
    return None
