"""PEM files named in the agent file, loaded the way the agent will load them.

``uplink.tls`` files go through :mod:`ssl` as paho-mqtt loads them when it connects
(CA bundle, then certificate chain and private key), so that a file that exists but
cannot be used fails ``edge check`` rather than every connection attempt of
``edge run``. ``trust.keys`` must be Ed25519 public keys (RFC 8410) in PEM. Each
function returns what is wrong, in words, or None when the file is fine.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
from pathlib import Path

_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")
_PUBLIC_KEY = re.compile(r"-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]*)-----END PUBLIC KEY-----")
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
"""The DER SubjectPublicKeyInfo of an Ed25519 key up to its 32 key bytes (RFC 8410 §4)."""
_KEY_TEXT_LIMIT = 1 << 16  # a PEM public key is a few hundred bytes


class _EncryptedKeyError(Exception):
    """Raised by the passphrase callback: the key is encrypted."""


def _no_passphrase() -> bytes:
    raise _EncryptedKeyError


def _ssl_reason(err: OSError) -> str:
    """The ssl error without the ``(_ssl.c:NNNN)`` source position."""
    return _SSL_SOURCE.sub("", str(err))


def ca_error(path: Path) -> str | None:
    """Why ``path`` cannot verify the broker (no PEM certificate in it)."""
    try:
        ssl.create_default_context(cafile=path)
    except OSError as err:
        return (
            f"cannot be loaded as CA certificates (PEM, -----BEGIN CERTIFICATE-----): "
            f"{_ssl_reason(err)}"
        )
    return None


def cert_error(path: Path) -> str | None:
    """Why ``path`` is not a client certificate (no PEM certificate in it)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except OSError as err:
        return (
            f"cannot be loaded as a certificate (PEM, -----BEGIN CERTIFICATE-----): "
            f"{_ssl_reason(err)}"
        )
    return None


def key_error(cert: Path, key: Path) -> str | None:
    """Why ``key`` is not the unencrypted PEM private key of the certificate ``cert``
    (which :func:`cert_error` accepts)."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKeyError:
        return "is encrypted, and the agent has no passphrase for it: store it unencrypted"
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            return f"does not match cert {os.path.abspath(cert)}: {_ssl_reason(err)}"
        return f"cannot be loaded as a PEM private key: {_ssl_reason(err)}"
    return None


def ed25519_key_error(path: Path) -> str | None:
    """Why ``path`` is not an Ed25519 public key in PEM (``openssl pkey -pubout``)."""
    with path.open("rb") as file:
        text = file.read(_KEY_TEXT_LIMIT).decode("ascii", errors="replace")
    block = _PUBLIC_KEY.search(text)
    try:
        der = base64.b64decode("".join(block.group(1).split()), validate=True) if block else b""
    except binascii.Error:
        der = b""
    if not der:
        return "holds no PEM public key (-----BEGIN PUBLIC KEY-----)"
    if len(der) != len(_ED25519_SPKI) + 32 or not der.startswith(_ED25519_SPKI):
        return "is a public key, but not an Ed25519 one (signatures are EdDSA/Ed25519)"
    return None
