"""Root key sets: files, trust bundles, rotation with overlap, and tokens from roots we do not trust."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from datetime import timedelta

import pytest

from capgate.capabilities import keys, tokens
from capgate.capabilities.errors import KeyFileError, TokenError
from capgate.capabilities.spec import Capability

from . import _support
from ._support import NOW


def test_a_written_key_set_reads_back_identically(tmp_path) -> None:
    keyset = keys.KeySet.generate(NOW)

    private_path, public_path = keyset.write(tmp_path / "keys")

    assert (private_path.name, public_path.name) == ("root.key", "root.pub")
    assert keys.KeySet.from_file(private_path) == keyset
    assert keys.TrustBundle.from_file(public_path) == keyset.trust_bundle()


def test_the_private_key_file_is_readable_by_its_owner_only(tmp_path) -> None:
    private_path, _public_path = keys.KeySet.generate(NOW).write(tmp_path)

    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_rewriting_a_world_readable_key_file_makes_it_private(tmp_path) -> None:
    (tmp_path / "root.key").write_text("old", encoding="utf-8")
    (tmp_path / "root.key").chmod(0o644)

    private_path, _ = keys.KeySet.generate(NOW).write(tmp_path)

    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_the_public_bundle_holds_no_private_key(tmp_path) -> None:
    keyset = keys.KeySet.generate(NOW)
    _, public_path = keyset.write(tmp_path)

    text = public_path.read_text(encoding="utf-8")
    assert keyset.active.private is not None
    assert keyset.active.private.hex() not in text
    assert "private" not in text


def test_a_key_set_whose_public_key_was_tampered_with_is_refused() -> None:
    document = json.loads(keys.KeySet.generate(NOW).to_json())
    public = bytearray.fromhex(document["keys"][0]["public"])
    public[0] ^= 0x01
    document["keys"][0]["public"] = public.hex()

    with pytest.raises(KeyFileError, match="public key does not match the private key"):
        keys.KeySet.from_json(json.dumps(document))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "invalid JSON"),
        ('{"kind": "something-else", "keys": []}', "not a capgate-root-keyset"),
        ('{"kind": "capgate-root-keyset", "keys": {}}', "'keys' must be a list"),
        ('{"kind": "capgate-root-keyset", "active": 1, "keys": []}', "active key id names no key"),
        ('{"kind": "capgate-root-keyset", "active": 1, "keys": [{"id": 1, "private": "00", "public": "00"}]}',
         "expected 64 hex characters"),
    ],
)
def test_a_broken_key_set_file_is_a_key_file_error(text: str, fragment: str) -> None:
    with pytest.raises(KeyFileError, match=fragment):
        keys.KeySet.from_json(text)


def test_an_empty_trust_bundle_is_refused() -> None:
    with pytest.raises(KeyFileError, match="holds no keys"):
        keys.TrustBundle.from_json('{"kind": "capgate-trust-bundle", "keys": []}')


def test_a_missing_key_file_is_a_key_file_error(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        keys.KeySet.from_file(tmp_path / "absent.key")


def test_a_key_id_outside_32_bits_is_refused() -> None:
    document = json.loads(keys.KeySet.generate(NOW).trust_bundle().to_json())
    document["keys"][0]["id"] = 2**32

    with pytest.raises(KeyFileError, match="32-bit unsigned integer"):
        keys.TrustBundle.from_json(json.dumps(document))


def test_rotation_keeps_the_old_key_verifying_until_its_not_after(booking: Capability) -> None:
    old = keys.KeySet.generate(NOW)
    token = tokens.mint(booking, old, now=NOW)
    rotated = old.rotate(timedelta(hours=2), now=NOW)
    bundle = keys.TrustBundle.from_json(rotated.trust_bundle().to_json())

    assert rotated.active_id != old.active_id
    assert tokens.load(token, bundle, now=NOW + timedelta(hours=2)).root_key_id == old.active_id
    with pytest.raises(TokenError) as info:
        tokens.load(token, bundle, now=NOW + timedelta(hours=2, seconds=1))
    assert info.value.reason == "unknown_root"


def test_after_rotation_new_credentials_are_signed_by_the_new_key(booking: Capability) -> None:
    rotated = keys.KeySet.generate(NOW).rotate(timedelta(hours=2), now=NOW)
    token = tokens.mint(booking, rotated, now=NOW)

    assert tokens.load(token, rotated.trust_bundle(), now=NOW + timedelta(days=30)).root_key_id == rotated.active_id


def test_pruning_drops_retired_keys_but_never_the_active_one() -> None:
    old = keys.KeySet.generate(NOW)
    rotated = old.rotate(timedelta(hours=1), now=NOW)

    assert len(rotated.prune(NOW + timedelta(minutes=59)).keys) == 2
    pruned = rotated.prune(NOW + timedelta(days=365))
    assert [k.key_id for k in pruned.keys] == [rotated.active_id]


def test_a_token_naming_an_unknown_root_key_id_is_refused(booking: Capability) -> None:
    token = tokens.mint(booking, keys.KeySet.generate(NOW), now=NOW)

    with pytest.raises(TokenError) as info:
        tokens.load(token, _support.trust(), now=NOW)
    assert info.value.reason == "unknown_root"
    assert info.value.code == "invalid_token"


def test_a_token_from_another_root_reusing_our_key_id_fails_its_signature(booking: Capability) -> None:
    ours = _support.keyset()
    theirs = keys.KeySet.generate(NOW)
    impostor_key = replace(theirs.active, key_id=ours.active_id)
    impostor = keys.KeySet(keys=(impostor_key,), active_id=ours.active_id)
    token = tokens.mint(booking, impostor, now=NOW)

    with pytest.raises(TokenError) as info:
        tokens.load(token, ours.trust_bundle(), now=NOW)
    assert info.value.reason == "bad_signature"


def test_a_trust_bundle_verifies_a_root_signature_only_with_the_right_key() -> None:
    keyset = keys.KeySet.generate(NOW)
    signature = keyset.active.sign(b"statement")
    bundle = keyset.trust_bundle()

    assert bundle.verify_signature(keyset.active_id, signature, b"statement", NOW)
    assert not bundle.verify_signature(keyset.active_id, signature, b"statemenT", NOW)
    assert not bundle.verify_signature(keyset.active_id + 1, signature, b"statement", NOW)
    assert not bundle.verify_signature(keyset.active_id, b"short", b"statement", NOW)


def test_a_public_only_key_cannot_sign() -> None:
    key = replace(keys.KeySet.generate(NOW).active, private=None)

    with pytest.raises(KeyFileError, match="has no private part"):
        key.sign(b"x")
