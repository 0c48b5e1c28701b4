"""Origins and hosts: what counts as the server's own origin, and as loopback."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["host_name", "is_loopback_bind", "is_loopback_host", "same_origin"]


def host_name(host_header: str) -> str:
    """`localhost:8051` -> `localhost`; `[::1]:8051` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_host(host_header: str) -> bool:
    """Whether a Host header names this machine by a loopback name or address."""
    return _is_loopback_name(host_name(host_header))


def is_loopback_bind(host: str) -> bool:
    """Whether a listen address (SIRA_HTTP_HOST) is reachable from this machine only."""
    return _is_loopback_name(host.strip("[]").lower())


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a browser's Origin names the host the request was sent to.

    Scheme aside (a proxy may end TLS in front of us), an Origin's host and port are
    the Host header of a same-origin request. `null` (sandboxed frames, file://) is
    never the server's own.
    """
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    netloc = parts.netloc.lower()
    host = host_header.strip().lower()
    default = ":443" if parts.scheme == "https" else ":80"
    return netloc == host or netloc + default == host or netloc == host.removesuffix(default)
