"""Host names and addresses as written in configuration: what is wrong, in words."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_host_name(text: str) -> bool:
    """RFC 1123 §2.1: dot-separated labels of 1..63 letters, digits and hyphens, not
    starting or ending with a hyphen, 253 characters at most (a final dot allowed); the
    last label is not all digits, so that a mistyped IPv4 address is no host name."""
    name = text.removesuffix(".")
    labels = name.split(".")
    return (
        len(name) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def host_error(key: str, value: str) -> str | None:
    """Why the non-empty ``value`` written at ``key`` (``ip``) is not an IPv4 or IPv6
    address or an RFC 1123 host name: it holds a port (``127.0.0.1:5020``), is a URL,
    has whitespace or IPv6 brackets, or is neither. None when it is fine."""
    if _is_address(value) or _is_host_name(value):
        return None
    return f"{key} {value!r} {_host_mistake(key, value)}"


def _host_mistake(key: str, value: str) -> str:
    """What is wrong with ``value``, which is neither an address nor a host name."""
    if any(c.isspace() for c in value):
        return "contains whitespace; give only the address or host name"
    if "://" in value:
        host = urlsplit(value).hostname
        example = f" ({key}: {host})" if host else ""
        return f"is a URL; give only the address or host name{example}, and the port in port"
    host, colon, port = value.rpartition(":")
    bare = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    if colon and port.isdigit() and (_is_address(bare) or _is_host_name(bare)):
        return (
            f"holds a port, which {key} does not take: put the port in port "
            f"({key}: {bare}, port: {port})"
        )
    if value.startswith("[") and value.endswith("]") and _is_address(value[1:-1]):
        return f"is an IPv6 address in brackets; give it without them ({key}: {value[1:-1]})"
    if re.fullmatch(r"[\d.]+", value):
        return "is not an IPv4 address (four numbers 0..255 joined by dots)"
    return (
        "is neither an IPv4/IPv6 address nor a host name (RFC 1123: dot-separated labels "
        "of 1..63 letters, digits and '-', not starting or ending with '-')"
    )
