"""End-to-end encryption in the reference client: no servers, just the crypto."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.crypto import MAX_PLAINTEXT, DecryptError, decrypt, encrypt
from client.keys import (
    GroupKey,
    KeyFileError,
    Keyring,
    add_key,
    generate_key_file,
    key_from_passphrase,
    load_key_file,
    new_key,
)

H, ALICE, BOB = uuid4(), uuid4(), uuid4()
KEY = new_key("k1")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=4096))
def test_round_trip_returns_plaintext_and_client_msg_id(body):
    cmid = uuid4()
    sealed = encrypt(KEY, H, ALICE, cmid, body)
    assert len(sealed.content) % 32 == 16  # padded envelope + tag
    opened = decrypt(KEY, H, ALICE, sealed.content, sealed.nonce, sealed.session_id)
    assert (opened.plaintext, opened.client_msg_id) == (body, cmid)


def test_largest_plaintext_fits_the_hub_limit_and_one_more_byte_is_refused():
    sealed = encrypt(KEY, H, ALICE, uuid4(), b"x" * MAX_PLAINTEXT)
    assert 16 <= len(sealed.content) <= 65536
    with pytest.raises(ValueError, match="plaintext"):
        encrypt(KEY, H, ALICE, uuid4(), b"x" * (MAX_PLAINTEXT + 1))


def test_every_message_gets_a_fresh_nonce():
    nonces = {encrypt(KEY, H, ALICE, uuid4(), b"hi").nonce for _ in range(1000)}
    assert len(nonces) == 1000


def test_any_flipped_bit_is_detected():
    sealed = encrypt(KEY, H, ALICE, uuid4(), b"attack at dawn")
    for name in ("content", "nonce"):
        blob = getattr(sealed, name)
        for i in range(0, len(blob) * 8, 7):
            flipped = bytearray(blob)
            flipped[i // 8] ^= 1 << (i % 8)
            args = {"content": sealed.content, "nonce": sealed.nonce, name: bytes(flipped)}
            with pytest.raises(DecryptError) as err:
                decrypt(KEY, H, ALICE, args["content"], args["nonce"], "k1")
            assert err.value.reason == "tampered"


def test_wrong_key_hoomi_or_sender_is_tampered_never_garbage():
    sealed = encrypt(KEY, H, ALICE, uuid4(), b"secret")
    cases = [(GroupKey("k1", os.urandom(32)), H, ALICE), (KEY, uuid4(), ALICE),
             (KEY, H, BOB)]
    for key, hoomi, sender in cases:
        with pytest.raises(DecryptError) as err:
            decrypt(key, hoomi, sender, sealed.content, sealed.nonce, "k1")
        assert err.value.reason == "tampered"


def test_unknown_session_and_unknown_sender():
    ring = Keyring()
    ring.add(H, KEY)
    sealed = encrypt(KEY, H, ALICE, uuid4(), b"x")
    with pytest.raises(DecryptError) as err:
        decrypt(ring, H, ALICE, sealed.content, sealed.nonce, "k9")
    assert err.value.reason == "unknown_session"
    with pytest.raises(DecryptError) as err:
        decrypt(ring, H, None, sealed.content, sealed.nonce, "k1")
    assert err.value.reason == "unknown_sender"


def test_key_file_generate_load_rotate(tmp_path: Path):
    path = tmp_path / "keys.json"
    ring = generate_key_file(path, [H])
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    sealed = encrypt(ring.current(H), H, ALICE, uuid4(), b"hello")
    loaded = load_key_file(path)
    assert decrypt(loaded, H, ALICE, sealed.content, sealed.nonce, sealed.session_id
                   ).plaintext == b"hello"
    newer = add_key(path, H)
    again = load_key_file(path)
    assert again.current(H).session_id == newer.session_id != sealed.session_id
    assert decrypt(again, H, ALICE, sealed.content, sealed.nonce, sealed.session_id
                   ).plaintext == b"hello"  # old messages still open after rotation
    with pytest.raises(FileExistsError):
        generate_key_file(path, [H])


def test_key_file_readable_by_others_is_refused(tmp_path: Path):
    path = tmp_path / "keys.json"
    generate_key_file(path, [H])
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="too open"):
        load_key_file(path)


def test_passphrase_keys_are_deterministic_per_hoomi():
    a = key_from_passphrase("correct horse battery staple", H)
    assert a == key_from_passphrase("correct horse battery staple", H)
    assert a.key != key_from_passphrase("correct horse battery staple", uuid4()).key
    assert a.key != key_from_passphrase("correct horse battery stapler", H).key


def test_key_repr_shows_no_key_material():
    key = new_key("k1")
    text = repr(key) + str(key) + repr([key])
    assert key.key.hex() not in text and base64.b64encode(key.key).decode() not in text
    assert repr(key.key) not in text
