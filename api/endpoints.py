"""Where a sandtrace server is and how to prove who you are to it: the service's URL checked
for clear text off this host, and the bearer token read from its file. The collector,
`sandtrace tail` and the service all use these, so they agree on what is accepted.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit


class InsecureURL(ValueError):
    """A plain-HTTP service address that is not on this host."""


def check_url(url: str, insecure: bool = False) -> str:
    """The service's base URL, checked: http(s) only; plain HTTP only to loopback unless
    `insecure` (events carry command lines, which may carry secrets)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"service URL {url!r} is not http://HOST:PORT or https://HOST:PORT")
    if parts.scheme == "http" and not insecure and not is_loopback(parts.hostname):
        raise InsecureURL(
            f"refusing to send events in clear text to {parts.hostname}: use https:// (with "
            "--server-ca-file if its certificate is private), or --insecure on a trusted network"
        )
    return url.rstrip("/")


def read_token_file(path: str) -> str:
    """The bearer token in a file (surrounding whitespace dropped); ValueError saying why
    when it cannot be read or is empty. The collector, `sandtrace tail` and the service all
    read theirs with it."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def is_loopback(host: str) -> bool:
    """Whether host (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
