"""Desired-state bundles: signed, versioned configuration from the control plane.

Wire format (DESIGN.md §6): the retained message on ``{prefix}/desired`` is a JWS
(RFC 7515) in compact serialization, ``header.payload.signature`` (ASCII), signed
with EdDSA over Ed25519 (RFC 8037). Header: ``{"alg": "EdDSA", "kid": <key id>,
"typ": "edge-bundle+json"}``; the key id is :func:`key_id` of the signing key. The
payload is a UTF-8 JSON object:

``version``
    integer ≥ 1, strictly increasing per node: a bundle whose version is not above
    the one running is refused as a replay.
``node``
    the gateway it is for; a bundle for another node is refused.
``issued_at``, ``expires_at``
    RFC 3339 times with a zone (``2026-12-03T08:00:00Z``); after ``expires_at`` the
    bundle is refused.
``devices``, ``deviceModels``
    KubeEdge Device and DeviceModel objects as in a manifest file.
``policies``, ``plugins``
    lists (network policies, WASM plugins).
``agent``
    agent-file sections that override the gateway's own file.

Verification needs only PyJWT and ``cryptography``, which the agent never imports
itself: it runs in the validating child (:mod:`edge.config.runtime`).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.uplink.topics import COMMANDS, MAX_COMMAND_BYTES

ALGORITHM: Final = "EdDSA"
TYPE: Final = "edge-bundle+json"
LIST_FIELDS: Final = ("devices", "deviceModels", "policies", "plugins")
MAX_BUNDLE_BYTES: Final = 4 << 20
"""A bundle larger than this is refused before it is parsed."""

Reason = Literal["unsigned", "malformed", "bad_signature", "unknown_key", "wrong_node",
                 "expired", "replayed", "invalid"]


class BundleError(ValueError):
    """A bundle that is refused; ``reason`` is one of :data:`Reason`, ``version`` the
    bundle's version when it could be read (else None)."""

    def __init__(self, reason: Reason, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.version = version


@dataclass(frozen=True, slots=True)
class Bundle:
    """A verified bundle. ``content`` is the payload object as signed (JSON values)."""

    version: int
    node: str
    issued_at: datetime
    expires_at: datetime
    key_id: str
    content: Mapping[str, Any] = field(repr=False)
    token: bytes = field(repr=False)

    @property
    def devices(self) -> list[Any]:
        """The KubeEdge Device objects."""
        return list(self.content.get("devices", []))

    @property
    def device_models(self) -> list[Any]:
        """The KubeEdge DeviceModel objects."""
        return list(self.content.get("deviceModels", []))

    @property
    def agent(self) -> Mapping[str, Any]:
        """Agent-file sections that override the gateway's own file."""
        agent = self.content.get("agent", {})
        return agent if isinstance(agent, Mapping) else {}


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id of a public key: the first 16 hex digits of the SHA-256 of its 32 raw
    bytes (stable across PEM encodings)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(pem: bytes, *, where: str = "key") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo, RFC 8410).

    Raises:
        ValueError: not a PEM public key, or not Ed25519 (``where`` names the source).
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ValueError(f"{where}: not a PEM public key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where}: a {type(key).__name__}, not an Ed25519 key")
    return key


def load_private_key(pem: bytes, *, where: str = "key") -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key from PEM (PKCS #8).

    Raises:
        ValueError: not an unencrypted PEM private key, or not Ed25519.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{where}: a {type(key).__name__}, not an Ed25519 key")
    return key


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as ``(private PEM (PKCS #8), public PEM (SPKI))``."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def rfc3339(t: datetime) -> str:
    """``t`` (aware) as RFC 3339 UTC with a ``Z``, to the second."""
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sign(content: Mapping[str, Any], private_key: Ed25519PrivateKey) -> bytes:
    """The compact JWS of ``content`` (the payload object), as it goes on the wire."""
    payload = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    header = {"kid": key_id(private_key.public_key()), "typ": TYPE}
    return jwt.api_jws.encode(payload, private_key, algorithm=ALGORITHM,
                              headers=header).encode("ascii")


def _header(token: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(token) > limit:
        raise BundleError("malformed", f"the {what} is {len(token)} bytes, more than {limit}")
    text = token.strip()
    if text.startswith(b"{"):
        raise BundleError("unsigned", f"the {what} is plain JSON, not a JWS: it is not signed")
    if text.count(b".") != 2:
        raise BundleError("malformed", f"the {what} is not a JWS in compact serialization "
                          "(header.payload.signature)")
    try:
        header = jwt.get_unverified_header(text)
    except jwt.PyJWTError as e:
        raise BundleError("malformed", f"the {what}'s JWS header cannot be read: {e}") from e
    alg = header.get("alg")
    if alg in (None, "none") or text.endswith(b"."):
        raise BundleError("unsigned", f"the {what}'s JWS is not signed (alg {alg!r})")
    if alg != ALGORITHM:
        raise BundleError("bad_signature", f"the {what} is signed with {alg!r}; only "
                          f"{ALGORITHM} (Ed25519) is accepted")
    return header


def _time(content: Mapping[str, Any], name: str, version: int) -> datetime:
    value = content.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        t = datetime.fromisoformat(value)
    except ValueError:
        raise BundleError("invalid", f"bundle version {version}: {name} must be an RFC 3339 "
                          f"time with a zone, got {value!r}", version) from None
    if t.tzinfo is None:
        raise BundleError("invalid", f"bundle version {version}: {name} {value!r} has no "
                          "time zone", version)
    return t


def _version(content: Mapping[str, Any]) -> int:
    version = content.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError("invalid", f"the bundle's version must be an integer ≥ 1, got "
                          f"{version!r}")
    return version


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    """A verified payload as a JSON object (``what``: bundle or command, for messages)."""
    try:
        content = json.loads(payload)
    except ValueError as e:
        raise BundleError("malformed", f"the {what}'s payload is not JSON: {e}") from e
    if not isinstance(content, dict):
        raise BundleError("malformed", f"the {what}'s payload is not a JSON object")
    return content


def _verified_payload(token: bytes, trusted: Sequence[Ed25519PublicKey], what: str,
                      limit: int) -> tuple[bytes, str]:
    """The payload of a JWS (a ``what``, at most ``limit`` bytes) signed by one of
    ``trusted`` and the signing key's id."""
    header = _header(token, what, limit)
    kid = header.get("kid")
    known = {key_id(k): k for k in trusted}
    if not known:
        raise BundleError("unknown_key", "this gateway trusts no key (trust.keys is empty): "
                          f"it accepts no {what}")
    if kid is not None and kid not in known:
        raise BundleError("unknown_key", f"the {what} is signed by key {kid!r}, which this "
                          f"gateway does not trust (trusted: {', '.join(sorted(known))})")
    candidates = [known[kid]] if kid is not None else list(known.values())
    payload: bytes | None = None
    for key in candidates:
        try:
            payload = jwt.api_jws.decode_complete(token.strip(), key, algorithms=[ALGORITHM])[
                "payload"]
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as e:
            raise BundleError("malformed", f"the {what}'s JWS cannot be read: {e}") from e
    if payload is None:
        who = f"key {kid!r}" if kid is not None else "any trusted key"
        raise BundleError("bad_signature", f"the {what}'s signature does not verify with {who}: "
                          "it was altered or signed by another key")
    return payload, kid if kid is not None else key_id(key)


def verify(
    token: bytes,
    trusted: Sequence[Ed25519PublicKey],
    *,
    node: str,
    now: datetime,
    running_version: int,
) -> Bundle:
    """Check a bundle as it came off the wire and return it.

    In order: it is a JWS, signed with EdDSA, by one of ``trusted`` (by ``kid``, or
    tried in turn without one), its payload is a JSON object with a ``version`` ≥ 1
    above ``running_version``, for ``node``, not expired at ``now``, with the list
    and object fields of the format. The content of ``devices`` etc. is not validated
    here (that is :func:`edge.config.runtime.build_runtime_config`'s job).

    Raises:
        BundleError: with the first reason found (:data:`Reason`) and a message that
            names the field or the key.
    """
    payload, kid = _verified_payload(token, trusted, "bundle", MAX_BUNDLE_BYTES)
    content = _json_object(payload, "bundle")
    version = _version(content)
    target = content.get("node")
    if target != node:
        raise BundleError("wrong_node", f"bundle version {version} is for node {target!r}, "
                          f"not for this gateway ({node!r})", version)
    if version <= running_version:
        raise BundleError("replayed", f"bundle version {version} is not newer than version "
                          f"{running_version}, the newest this gateway has taken", version)
    issued, expires = _time(content, "issued_at", version), _time(content, "expires_at", version)
    if now >= expires:
        raise BundleError("expired", f"bundle version {version} expired at {rfc3339(expires)}",
                          version)
    for name in LIST_FIELDS:
        if not isinstance(content.get(name, []), list):
            raise BundleError("invalid", f"bundle version {version}: {name} must be a list",
                              version)
    if not isinstance(content.get("agent", {}), dict):
        raise BundleError("invalid", f"bundle version {version}: agent must be an object",
                          version)
    return Bundle(version, node, issued, expires, kid, content, token.strip())



COMMAND_TTL: Final = timedelta(minutes=5)
"""How long a signed command stays valid (a replay after that is refused)."""


def signed_bundle(body: Mapping[str, Any], key: Ed25519PrivateKey, *, version: int, node: str,
                  now: datetime, expires_s: int) -> bytes:
    """The wire form of a bundle for ``node``: ``body`` (devices, deviceModels, …; the
    lists it lacks are empty) with ``version``, ``node`` and its times, signed."""
    return sign({"devices": [], "deviceModels": [], "policies": [], "plugins": [], "agent": {},
                 **body, "version": version, "node": node, "issued_at": rfc3339(now),
                 "expires_at": rfc3339(now + timedelta(seconds=expires_s))}, key)


def signed_command(key: Ed25519PrivateKey, command: str, *, node: str, now: datetime,
                   **fields: Any) -> tuple[str, bytes]:
    """A ``cmd/{command}`` for ``node`` with ``fields`` (see COMMANDS): its fresh
    ``id`` and its wire form, valid for COMMAND_TTL."""
    cid = uuid.uuid4().hex
    return cid, sign({**fields, "command": command, "id": cid, "node": node,
                      "issued_at": rfc3339(now), "expires_at": rfc3339(now + COMMAND_TTL)}, key)


def _optional_int(v: object) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _name(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _device_key(v: object) -> bool:
    return isinstance(v, str) and v.count("/") == 1 and all(v.split("/"))


def _value(v: object) -> bool:
    return isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v))


def _values(v: object) -> bool:
    return isinstance(v, dict) and bool(v) and all(_value(x) for x in v.values())


_VALUE = "must be a finite number, true/false or a string"
COMMAND_FIELDS: Final[dict[str, tuple[tuple[str, Callable[[object], bool], str], ...]]] = {
    "rollback": (("version", _optional_int, "version must be an integer"),),
    "write": (("device", _device_key, "device must be the device key, namespace/name"),
              ("property", _name, "property must be a property name"),
              ("value", _value, f"value {_VALUE}")),
    "method": (("device", _device_key, "device must be the device key, namespace/name"),
               ("method", _name, "method must be a method name"),
               ("values", _values, f"values must be an object: property name → value that "
                                   f"{_VALUE}")),
}
"""The fields of each command of :data:`edge.uplink.topics.COMMANDS`, checked in this
order: ``rollback`` ``version`` (absent or null: the one before the running version);
``write`` the device key, property and value (engineering units); ``method`` the device
key, the Device method and ``values`` (property name → value)."""


def verify_command(
    token: bytes, trusted: Sequence[Ed25519PublicKey], *, node: str, now: datetime,
    expected: str,
) -> dict[str, Any]:
    """Check a signed command that arrived on ``…/cmd/{expected}``, signed like a
    bundle; its payload: ``{"command": expected, "id": str, "node", "issued_at",
    "expires_at", …}`` with the fields of COMMANDS. Replays within ``expires_at`` are
    the caller's to catch, by ``id``: a command is valid for at most COMMAND_TTL
    (``expires_at - issued_at``), and not when issued more than that ahead of ``now``.

    Raises:
        BundleError: as :func:`verify`, except ``replayed``; ``invalid`` for an unknown
            command, one for another topic, a missing id or a field of the wrong shape.
    """
    payload, _kid = _verified_payload(token, trusted, "command", MAX_COMMAND_BYTES)
    content = _json_object(payload, "command")
    name, cid = content.get("command"), content.get("id")
    if name not in COMMANDS:
        raise BundleError("invalid", f"unknown command {name!r} (known: {', '.join(COMMANDS)})")
    if name != expected:
        raise BundleError("invalid", f"a {name!r} command arrived on cmd/{expected}")
    if not isinstance(cid, str) or not cid:
        raise BundleError("invalid", "the command has no id")
    if content.get("node") != node:
        raise BundleError("wrong_node", f"command {cid} is for node {content.get('node')!r}, "
                          f"not for this gateway ({node!r})")
    problem = next((why for f, ok, why in COMMAND_FIELDS[name] if not ok(content.get(f))),
                   None)
    if problem:
        raise BundleError("invalid", f"command {cid}: {problem}")
    issued, expires = _time(content, "issued_at", 0), _time(content, "expires_at", 0)
    if expires - issued > COMMAND_TTL:
        raise BundleError("invalid", f"command {cid} is valid for {expires - issued}, more "
                          f"than {COMMAND_TTL} (expires_at - issued_at)")
    if issued > now + COMMAND_TTL:
        raise BundleError("invalid", f"command {cid} is issued at {content['issued_at']}, "
                          "in the future (is the gateway's or the sender's clock wrong?)")
    if now >= expires:
        raise BundleError("expired", f"command {cid} expired at {content['expires_at']}")
    return content
