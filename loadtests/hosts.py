"""Which hosts a load test may target: loopback only, unless the operator opts in.

Kept apart from the locustfile so it can be unit-tested without importing locust (which
monkey-patches the standard library through gevent).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse


class HostNotAllowed(ValueError):
    pass


def resolve(host: str) -> list[str]:
    """The addresses a host name stands for (an IP literal is returned as is, no lookup)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except socket.gaierror as e:
        raise HostNotAllowed(f"cannot resolve {host!r}: {e}") from None


def check_target(url: str | None, allow_remote: bool = False) -> str:
    """Return the URL if a load test may send traffic there, else raise HostNotAllowed.

    Without ``allow_remote`` every address the host resolves to must be loopback
    (127.0.0.0/8, ::1): the suite and CI only ever load their own local server. Point it at
    your own deployment (e.g. a port-forward, or an ingress) with --allow-remote.
    """
    if not url:
        raise HostNotAllowed("no --host given (e.g. --host http://127.0.0.1:8000)")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise HostNotAllowed(f"--host {url!r} is not an http(s) URL")
    if allow_remote:
        return url
    addresses = resolve(parsed.hostname)
    remote = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if not addresses or remote:
        raise HostNotAllowed(
            f"--host {url!r} resolves to {', '.join(remote or addresses)}, not loopback; "
            "pass --allow-remote to load a server you operate elsewhere"
        )
    return url
