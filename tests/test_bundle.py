"""Desired bundles: JWS (EdDSA) signatures, key rotation and every way to refuse one."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.config.pem import ed25519_key_error
from edge.sync.bundle import (
    MAX_BUNDLE_BYTES,
    BundleError,
    key_id,
    load_private_key,
    load_public_key,
    new_key_pair,
    rfc3339,
    sign,
    verify,
    verify_command,
)

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def content(version: int = 7, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": version, "node": "gw-1", "issued_at": rfc3339(NOW),
        "expires_at": rfc3339(NOW + timedelta(days=7)), "devices": [], "deviceModels": [],
        "policies": [], "plugins": [], "agent": {"log": {"level": "debug"}},
    }
    body.update(over)
    return body


def check(token: bytes, trusted: list[Ed25519PublicKey], running: int = 6) -> Any:
    return verify(token, trusted, node="gw-1", now=NOW, running_version=running)


def refused(token: bytes, trusted: list[Ed25519PublicKey], running: int = 6) -> BundleError:
    with pytest.raises(BundleError) as e:
        check(token, trusted, running)
    return e.value


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_a_signed_bundle_verifies_with_its_content(key: Ed25519PrivateKey) -> None:
    b = check(sign(content(), key), [key.public_key()])
    assert (b.version, b.node, b.key_id) == (7, "gw-1", key_id(key.public_key()))
    assert b.expires_at == NOW + timedelta(days=7)
    assert b.agent == {"log": {"level": "debug"}}
    assert b.content == content()


def test_key_rotation_accepts_any_listed_key(key: Ed25519PrivateKey) -> None:
    old, new = Ed25519PrivateKey.generate(), key
    trusted = [old.public_key(), new.public_key()]
    assert check(sign(content(), new), trusted).key_id == key_id(new.public_key())
    assert check(sign(content(), old), trusted).key_id == key_id(old.public_key())


def test_without_kid_each_trusted_key_is_tried(key: Ed25519PrivateKey) -> None:
    token = jwt.api_jws.encode(json.dumps(content()).encode(), key, algorithm="EdDSA")
    other = Ed25519PrivateKey.generate().public_key()
    assert check(token.encode(), [other, key.public_key()]).version == 7
    assert refused(token.encode(), [other]).reason == "bad_signature"


def test_plain_json_is_refused_as_unsigned(key: Ed25519PrivateKey) -> None:
    e = refused(json.dumps(content()).encode(), [key.public_key()])
    assert e.reason == "unsigned"
    assert "not signed" in str(e)


def test_alg_none_is_refused_as_unsigned(key: Ed25519PrivateKey) -> None:
    token = b".".join([b64(b'{"alg":"none"}'), b64(json.dumps(content()).encode()), b""])
    assert refused(token, [key.public_key()]).reason == "unsigned"


def test_a_hmac_signature_is_refused(key: Ed25519PrivateKey) -> None:
    # algorithm confusion: HS256 keyed with something public must never pass
    token = jwt.api_jws.encode(json.dumps(content()).encode(), "s" * 32, algorithm="HS256")
    e = refused(token.encode(), [key.public_key()])
    assert e.reason == "bad_signature"
    assert "HS256" in str(e)


def test_a_flipped_bit_in_the_payload_breaks_the_signature(key: Ed25519PrivateKey) -> None:
    header, payload, signature = sign(content(), key).split(b".")
    raw = bytearray(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    raw[raw.index(b"7")] ^= 0x01  # version 7 -> 6: still valid JSON
    e = refused(b".".join([header, b64(bytes(raw)), signature]), [key.public_key()])
    assert e.reason == "bad_signature"
    assert key_id(key.public_key()) in str(e)


def test_a_flipped_bit_in_the_signature_is_refused(key: Ed25519PrivateKey) -> None:
    header, payload, signature = sign(content(), key).split(b".")
    sig = bytearray(base64.urlsafe_b64decode(signature + b"=" * (-len(signature) % 4)))
    sig[0] ^= 0x80
    assert refused(b".".join([header, payload, b64(bytes(sig))]),
                   [key.public_key()]).reason == "bad_signature"


def test_an_unknown_key_is_named(key: Ed25519PrivateKey) -> None:
    stranger = Ed25519PrivateKey.generate()
    e = refused(sign(content(), stranger), [key.public_key()])
    assert e.reason == "unknown_key"
    assert key_id(stranger.public_key()) in str(e)
    assert key_id(key.public_key()) in str(e)


def test_no_trusted_key_accepts_nothing(key: Ed25519PrivateKey) -> None:
    e = refused(sign(content(), key), [])
    assert e.reason == "unknown_key"
    assert "trust.keys" in str(e)


def test_an_older_or_equal_version_is_a_replay(key: Ed25519PrivateKey) -> None:
    for running in (7, 8):
        e = refused(sign(content(7), key), [key.public_key()], running=running)
        assert (e.reason, e.version) == ("replayed", 7)


def test_an_expired_bundle_is_refused(key: Ed25519PrivateKey) -> None:
    token = sign(content(expires_at=rfc3339(NOW - timedelta(seconds=1))), key)
    e = refused(token, [key.public_key()])
    assert e.reason == "expired"
    assert "2026-12-03T07:59:59Z" in str(e)


def test_a_bundle_for_another_node_is_refused(key: Ed25519PrivateKey) -> None:
    e = refused(sign(content(node="gw-2"), key), [key.public_key()])
    assert e.reason == "wrong_node"
    assert "'gw-2'" in str(e)


@pytest.mark.parametrize(("over", "words"), [
    ({"version": 0}, "version must be an integer"),
    ({"version": True}, "version must be an integer"),
    ({"version": "7"}, "version must be an integer"),
    ({"expires_at": "next week"}, "expires_at must be an RFC 3339"),
    ({"issued_at": "2026-12-03T08:00:00"}, "has no time zone"),
    ({"devices": {"a": 1}}, "devices must be a list"),
    ({"agent": []}, "agent must be an object"),
])
def test_invalid_fields_are_named(key: Ed25519PrivateKey, over: dict[str, Any],
                                  words: str) -> None:
    e = refused(sign(content(**over), key), [key.public_key()])
    assert e.reason == "invalid"
    assert words in str(e)


def test_malformed_tokens(key: Ed25519PrivateKey) -> None:
    assert refused(b"abc.def", [key.public_key()]).reason == "malformed"
    assert refused(b"!!!.###.$$$", [key.public_key()]).reason == "malformed"
    payload_not_json = jwt.api_jws.encode(b"[1,", key, algorithm="EdDSA",
                                          headers={"kid": key_id(key.public_key())})
    assert refused(payload_not_json.encode(), [key.public_key()]).reason == "malformed"
    huge = b"a." + b"b" * MAX_BUNDLE_BYTES + b".c"
    assert "more than" in str(refused(huge, [key.public_key()]))


def test_key_pairs_round_trip_through_pem_and_pass_edge_check(tmp_path: Any) -> None:
    private_pem, public_pem = new_key_pair()
    private, public = load_private_key(private_pem), load_public_key(public_pem)
    assert key_id(private.public_key()) == key_id(public)
    path = tmp_path / "cloud.pub"
    path.write_bytes(public_pem)
    assert ed25519_key_error(path) is None  # what the agent file's trust.keys accepts
    with pytest.raises(ValueError, match=r"k\.pem: not a PEM public key"):
        load_public_key(private_pem, where="k.pem")


def command(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"command": "rollback", "id": "c1", "node": "gw-1", "version": 3,
                            "issued_at": rfc3339(NOW),
                            "expires_at": rfc3339(NOW + timedelta(minutes=5))}
    body.update(over)
    return body


def test_signed_commands_are_verified_like_bundles(key: Ed25519PrivateKey) -> None:
    def check_cmd(body: dict[str, Any], signer: Ed25519PrivateKey = key,
                  topic: str | None = None) -> Any:
        return verify_command(sign(body, signer), [key.public_key()], node="gw-1", now=NOW,
                              expected=topic or body["command"])

    assert check_cmd(command())["version"] == 3
    write = command(command="write", device="plant/meter-1", property="setpoint", value=42)
    assert check_cmd(write)["value"] == 42
    method = command(command="method", device="plant/meter-1", method="start",
                     values={"run": True, "speed": 12.5})
    assert check_cmd(method)["values"] == {"run": True, "speed": 12.5}
    cases = [
        (command(command="reboot"), None, "invalid", "unknown command 'reboot'"),
        (command(), "write", "invalid", "a 'rollback' command arrived on cmd/write"),
        (command(id=""), None, "invalid", "no id"),
        (command(node="gw-2"), None, "wrong_node", "'gw-2'"),
        (command(version="3"), None, "invalid", "version must be an integer"),
        (command(expires_at=rfc3339(NOW)), None, "expired", "expired"),
        (command(expires_at=rfc3339(NOW + timedelta(days=3650))), None, "invalid",
         "more than 0:05:00"),
        (command(issued_at=rfc3339(NOW + timedelta(hours=1)),
                 expires_at=rfc3339(NOW + timedelta(hours=1, minutes=5))), None, "invalid",
         "in the future"),
        ({**write, "device": "meter-1"}, None, "invalid", "device must be the device key"),
        ({**write, "property": 7}, None, "invalid", "property must be a property name"),
        ({k: v for k, v in write.items() if k != "value"}, None, "invalid", "value must be"),
        ({**write, "value": [1, 2]}, None, "invalid", "value must be"),
        ({**write, "value": float("nan")}, None, "invalid", "must be a finite number"),
        ({**method, "method": ""}, None, "invalid", "method must be a method name"),
        ({**method, "values": {}}, None, "invalid", "values must be an object"),
        ({**method, "values": {"run": None}}, None, "invalid", "values must be an object"),
    ]
    for body, topic, reason, words in cases:
        with pytest.raises(BundleError) as e:
            check_cmd(body, topic=topic)
        assert e.value.reason == reason
        assert words in str(e.value)
    with pytest.raises(BundleError) as e:
        check_cmd(command(), Ed25519PrivateKey.generate())
    assert e.value.reason == "unknown_key"
