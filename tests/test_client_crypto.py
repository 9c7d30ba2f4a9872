"""End-to-end encryption in the reference client: no servers, just the crypto."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from uuid import uuid4

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from hoomi_client.crypto import (
    AD_PREFIX,
    HEADER_BYTES,
    MAX_CONTENT,
    MAX_PLAINTEXT,
    DecryptError,
    decrypt,
    encrypt,
)
from hoomi_client.keys import (
    GroupKey,
    KeyFileError,
    Keyring,
    add_hoomi_key,
    add_key,
    generate_key_file,
    key_from_passphrase,
    load_key_file,
    new_key,
)

H, ALICE, BOB = uuid4(), uuid4(), uuid4()
KEY = new_key("k1")


def sealed_hello():
    return encrypt(KEY, H, ALICE, uuid4(), b"attack at dawn")


def reason(key, hoomi, sender, content, nonce, session_id="k1"):
    with pytest.raises(DecryptError) as err:
        decrypt(key, hoomi, sender, content, nonce, session_id)
    return err.value.reason


# Bodies of every size up to the limit: short ones often, since that is where the
# header and padding arithmetic has its edges, and large ones from a seeded Random.
bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n, r: r.randbytes(n), st.integers(0, MAX_PLAINTEXT), st.randoms()),
)


@settings(max_examples=200, deadline=None)
@given(bodies)
def test_round_trip_returns_the_plaintext_and_client_msg_id(body):
    cmid = uuid4()
    sealed = encrypt(KEY, H, ALICE, cmid, body)
    assert sealed.session_id == "k1" and len(sealed.nonce) == 12
    assert (len(sealed.content) - 16) % 32 == 0  # padded envelope, then the tag
    assert 16 <= len(sealed.content) <= MAX_CONTENT
    opened = decrypt(KEY, H, ALICE, sealed.content, sealed.nonce, sealed.session_id)
    assert (opened.plaintext, opened.client_msg_id) == (body, cmid)


def test_sizes_are_hidden_to_within_32_bytes():
    sizes = {len(encrypt(KEY, H, ALICE, uuid4(), b"x" * n).content) for n in range(0, 28)}
    assert sizes == {32 * 2 + 16}
    assert len(encrypt(KEY, H, ALICE, uuid4(), b"x" * 28).content) == 32 * 3 + 16


def test_largest_plaintext_fits_the_hub_limit_and_one_more_byte_is_refused():
    assert MAX_PLAINTEXT == 65536 - 16 - 16 - HEADER_BYTES == 65467
    sealed = encrypt(KEY, H, ALICE, uuid4(), b"x" * MAX_PLAINTEXT)
    assert len(sealed.content) == 65520
    with pytest.raises(ValueError, match=f"at most {MAX_PLAINTEXT} bytes"):
        encrypt(KEY, H, ALICE, uuid4(), b"x" * (MAX_PLAINTEXT + 1))


def test_every_message_gets_a_fresh_nonce():
    nonces = {encrypt(KEY, H, ALICE, uuid4(), b"hi").nonce for _ in range(1000)}
    assert len(nonces) == 1000


def test_same_body_seals_to_different_content_each_time():
    cmid = uuid4()
    assert encrypt(KEY, H, ALICE, cmid, b"hi").content != encrypt(KEY, H, ALICE, cmid,
                                                                   b"hi").content


@pytest.mark.parametrize("field", ["content", "nonce"])
def test_flipping_any_single_bit_is_tampered(field):
    sealed = sealed_hello()
    blob = getattr(sealed, field)
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        parts = {"content": sealed.content, "nonce": sealed.nonce, field: bytes(flipped)}
        assert reason(KEY, H, ALICE, parts["content"], parts["nonce"]) == "tampered"


def test_truncated_or_extended_content_is_tampered():
    sealed = sealed_hello()
    for content in (sealed.content[:-1], sealed.content[1:], sealed.content + b"\x00",
                    sealed.content[:32] + sealed.content[64:]):
        assert reason(KEY, H, ALICE, content, sealed.nonce) == "tampered"


def test_wrong_key_under_the_same_session_is_tampered():
    sealed = sealed_hello()
    other = GroupKey("k1", os.urandom(32))
    assert reason(other, H, ALICE, sealed.content, sealed.nonce) == "tampered"


def test_replayed_into_another_hoomi_is_tampered():
    sealed = sealed_hello()
    ring = Keyring()
    other_hoomi = uuid4()
    ring.add(other_hoomi, KEY)  # even where the same key is in use
    assert reason(ring, other_hoomi, ALICE, sealed.content, sealed.nonce) == "tampered"


def test_attributed_to_another_sender_is_tampered():
    sealed = sealed_hello()
    assert reason(KEY, H, BOB, sealed.content, sealed.nonce) == "tampered"


def test_relabelled_to_another_session_with_the_same_key_is_tampered():
    sealed = sealed_hello()
    alias = GroupKey("k2", KEY.key)
    assert reason(alias, H, ALICE, sealed.content, sealed.nonce, "k2") == "tampered"


def test_message_of_a_deleted_sender_still_opens_unattributed():
    cmid = uuid4()
    sealed = encrypt(KEY, H, ALICE, cmid, b"still here")
    opened = decrypt(KEY, H, None, sealed.content, sealed.nonce, "k1")
    assert (opened.plaintext, opened.client_msg_id) == (b"still here", cmid)


def test_unknown_session_names_the_session_not_the_key():
    ring = Keyring()
    ring.add(H, KEY)
    sealed = sealed_hello()
    with pytest.raises(DecryptError) as err:
        decrypt(ring, H, ALICE, sealed.content, sealed.nonce, "k9")
    assert err.value.reason == "unknown_session"
    assert str(err.value) == f"unknown_session: no key for session 'k9' of hoomi {H}"
    assert reason(ring, uuid4(), ALICE, sealed.content, sealed.nonce) == "unknown_session"
    assert reason(KEY, H, ALICE, sealed.content, sealed.nonce, "k9") == "unknown_session"


def summary(key, hoomi, sender, content, nonce, session_id="k1"):
    with pytest.raises(DecryptError) as err:
        decrypt(key, hoomi, sender, content, nonce, session_id)
    return err.value.summary


def test_a_missing_or_wrong_key_is_never_called_an_attack():
    sealed = sealed_hello()
    # No key by that name: the reader lacks the key, and is told exactly that.
    assert summary(Keyring(), H, ALICE, sealed.content, sealed.nonce) == (
        "no key for this message's key id 'k1'")
    # A key of that name with other bytes fails the tag exactly as altered bytes do:
    # both possibilities are named, never "tampered" alone.
    wrong = summary(GroupKey("k1", os.urandom(32)), H, ALICE, sealed.content, sealed.nonce)
    flipped = bytes([sealed.content[0] ^ 1]) + sealed.content[1:]
    assert wrong == summary(KEY, H, ALICE, flipped, sealed.nonce) == "wrong key or tampered"
    # Authentic, but the hub names another sender: that one can only be tampering.
    assert summary(KEY, H, BOB, sealed.content, sealed.nonce) == (
        "tampered: sealed by another sender than the hub reports")
    assert "tampered" not in summary(KEY, H, ALICE, sealed.content, b"x")  # malformed


def test_key_files_made_apart_name_their_keys_apart(tmp_path: Path):
    one = generate_key_file(tmp_path / "one.json", [H]).current(H)
    two = generate_key_file(tmp_path / "two.json", [H]).current(H)
    assert one.session_id != two.session_id
    assert one.session_id.startswith("k1-") and two.session_id.startswith("k1-")
    sealed = encrypt(one, H, ALICE, uuid4(), b"hi")
    ring = load_key_file(tmp_path / "two.json")
    assert summary(ring, H, ALICE, sealed.content, sealed.nonce, sealed.session_id) == (
        f"no key for this message's key id {one.session_id!r}")


@pytest.mark.parametrize("nonce_size", [0, 8, 11, 13, 16])
def test_nonce_of_the_wrong_length_is_malformed(nonce_size):
    sealed = sealed_hello()
    assert reason(KEY, H, ALICE, sealed.content, os.urandom(nonce_size)) == "malformed"


def test_content_shorter_than_the_tag_is_malformed():
    assert reason(KEY, H, ALICE, b"\x00" * 15, os.urandom(12)) == "malformed"


def seal_raw(envelope: bytes) -> tuple[bytes, bytes]:
    """Seal an arbitrary envelope the way a buggy or future client might."""
    nonce = os.urandom(12)
    return AESGCM(KEY.key).encrypt(nonce, envelope, AD_PREFIX + H.bytes + b"k1"), nonce


def header(version: int, length: int) -> bytes:
    return bytes([version]) + uuid4().bytes + ALICE.bytes + length.to_bytes(4, "big")


@pytest.mark.parametrize("envelope", [
    b"",                                        # no header
    b"\x01" * 36,                               # shorter than the header
    header(2, 5) + b"hello" + bytes(22),        # unknown version
    header(1, 99) + b"hello" + bytes(22),       # length beyond the envelope
    header(1, 5) + b"hello" + bytes(21) + b"\x01",  # padding not zero
    header(1, 5) + b"hello",                    # not padded to 32
    header(1, 5) + b"hello" + bytes(22 + 32),   # padded further than needed
], ids=["empty", "short", "version", "length", "padding", "unpadded", "overpadded"])
def test_authentic_envelope_that_does_not_parse_is_malformed(envelope):
    content, nonce = seal_raw(envelope)
    assert reason(KEY, H, ALICE, content, nonce) == "malformed"


def test_errors_hold_neither_key_nor_plaintext():
    secret = b"the plaintext nobody may log"
    sealed = encrypt(KEY, H, ALICE, uuid4(), secret)
    texts = []
    for args in [(GroupKey("k1", os.urandom(32)), H, ALICE), (KEY, H, BOB)]:
        with pytest.raises(DecryptError) as err:
            decrypt(*args, sealed.content, sealed.nonce, "k1")
        texts.append(str(err.value) + repr(err.value))
    text = "".join(texts)
    assert secret.decode() not in text and KEY.key.hex() not in text
    assert secret.decode() not in repr(decrypt(KEY, H, ALICE, sealed.content, sealed.nonce, "k1"))


def test_encrypt_refuses_text_instead_of_bytes():
    with pytest.raises(TypeError, match="bytes"):
        encrypt(KEY, H, ALICE, uuid4(), "hello")  # type: ignore[arg-type]


# -- keys ----------------------------------------------------------------------------

def test_keyring_encrypts_with_the_latest_key_and_opens_with_any():
    ring = Keyring()
    old, new = new_key("k1"), new_key("k2")
    ring.add(H, old)
    before = encrypt(ring.current(H), H, ALICE, uuid4(), b"before")
    ring.add(H, new)
    assert ring.current(H) == new and ring.get(H, "k1") == old
    after = encrypt(ring.current(H), H, ALICE, uuid4(), b"after")
    assert (before.session_id, after.session_id) == ("k1", "k2")
    for sealed, body in [(before, b"before"), (after, b"after")]:
        assert decrypt(ring, H, ALICE, sealed.content, sealed.nonce,
                       sealed.session_id).plaintext == body


def test_keyring_refuses_a_second_key_under_a_taken_session_id():
    ring = Keyring()
    ring.add(H, KEY)
    ring.add(H, GroupKey("k1", KEY.key))  # the same key again: harmless
    with pytest.raises(KeyFileError, match="already has a different key named 'k1'"):
        ring.add(H, new_key("k1"))
    assert ring.get(H, "k1") == KEY


def test_keyring_without_a_key_for_the_hoomi_says_so():
    with pytest.raises(KeyFileError, match=f"no key for hoomi {H}"):
        Keyring().current(H)


@pytest.mark.parametrize("session_id, key, message", [
    ("k1", os.urandom(31), "32 bytes, not 31"),
    ("k1", os.urandom(33), "32 bytes, not 33"),
    ("", os.urandom(32), "session_id"),
    ("k" * 129, os.urandom(32), "session_id"),
    ("k\x001", os.urandom(32), "session_id"),
])
def test_group_key_validates_its_size_and_session_id(session_id, key, message):
    with pytest.raises(KeyFileError, match=message):
        GroupKey(session_id, key)
    GroupKey("é" * 128, os.urandom(32))  # 128 characters, whatever their UTF-8 size


def test_group_key_repr_shows_no_key_material():
    key = new_key("k1")
    text = repr(key) + str(key) + repr([key]) + f"{key}" + repr(Keyring())
    assert text.count("<hidden>") == 4
    for form in (key.key.hex(), base64.b64encode(key.key).decode(), repr(key.key),
                 base64.urlsafe_b64encode(key.key).decode()):
        assert form not in text


def test_key_file_generate_then_load_opens_messages(tmp_path: Path):
    path = tmp_path / "keys.json"
    other = uuid4()
    ring = generate_key_file(path, [H, other, H])
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data["version"] == 1 and set(data["hoomis"]) == {str(H), str(other)}
    (entry,) = data["hoomis"][str(H)]
    assert entry["session_id"].startswith("k1-")
    assert base64.b64decode(data["hoomis"][str(H)][0]["key"]) == ring.current(H).key
    sealed = encrypt(ring.current(H), H, ALICE, uuid4(), b"hello")
    loaded = load_key_file(path)
    assert loaded.current(other) == ring.current(other) != ring.current(H)
    assert decrypt(loaded, H, ALICE, sealed.content, sealed.nonce,
                   sealed.session_id).plaintext == b"hello"


def test_generate_key_file_never_overwrites(tmp_path: Path):
    path = tmp_path / "keys.json"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        generate_key_file(path, [H])
    assert path.read_text() == "precious"


def test_rotation_makes_a_new_current_key_and_old_messages_still_open(tmp_path: Path):
    path = tmp_path / "keys.json"
    ring = generate_key_file(path, [H])
    old = encrypt(ring.current(H), H, ALICE, uuid4(), b"hello")
    newer = add_key(path, H)
    assert newer.session_id.startswith("k2-") and len(newer.session_id) == 11
    named = add_key(path, H, "epoch-3")
    again = load_key_file(path)
    assert again.current(H) == named and again.get(H, newer.session_id) == newer
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]  # no temp left
    assert decrypt(again, H, ALICE, old.content, old.nonce, old.session_id).plaintext == b"hello"
    with pytest.raises(KeyFileError, match="already has a key named 'epoch-3'"):
        add_key(path, H, "epoch-3")


def test_key_received_out_of_band_is_stored_and_becomes_current(tmp_path: Path):
    path = tmp_path / "keys.json"
    add_hoomi_key(path, H, KEY)
    assert path.stat().st_mode & 0o777 == 0o600
    passphrase_key = GroupKey("pw1", os.urandom(32))
    add_hoomi_key(path, H, passphrase_key)
    assert load_key_file(path).current(H) == passphrase_key
    with pytest.raises(KeyFileError, match="different key named 'k1'"):
        add_hoomi_key(path, H, new_key("k1"))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_file_open_to_group_or_others_is_refused(tmp_path: Path, mode):
    path = tmp_path / "keys.json"
    generate_key_file(path, [H])
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"permissions {mode:04o} are too open.*chmod 600"):
        load_key_file(path)
    with pytest.raises(KeyFileError, match="too open"):
        add_key(path, H)


def test_key_file_readable_only_by_its_owner_loads(tmp_path: Path):
    path = tmp_path / "keys.json"
    generate_key_file(path, [H])
    path.chmod(0o400)
    assert load_key_file(path).current(H).session_id.startswith("k1-")


def write_key_file(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(0o600)
    return path


GOOD = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize("data, message", [
    ("{not json", "not valid JSON"),
    ({"version": 2, "hoomis": {}}, "not a version 1 Hoomi key file"),
    ({"version": 1}, "not a version 1 Hoomi key file"),
    ({"version": 1, "hoomis": {"nope": []}}, "hoomi 'nope': not a UUID"),
    ({"version": 1, "hoomis": {str(H): {}}}, "expected a list of keys"),
    ({"version": 1, "hoomis": {str(H): ["k1"]}}, "key 1: expected an object"),
    ({"version": 1, "hoomis": {str(H): [{"session_id": 1, "key": GOOD}]}},
     "key 1: session_id must be a string"),
    ({"version": 1, "hoomis": {str(H): [{"session_id": "k1", "key": "@@@@"}]}},
     "key 1: key is not valid base64"),
    ({"version": 1, "hoomis": {str(H): [{"session_id": "k1", "key": "AAAA"}]}},
     "key 1: a group key is 32 bytes, not 3"),
    ({"version": 1, "hoomis": {str(H): [
        {"session_id": "k1", "key": GOOD},
        {"session_id": "k1", "key": base64.b64encode(b"\x01" * 32).decode()}]}},
     "key 2: .*already has a different key named 'k1'"),
])
def test_broken_key_file_is_refused_with_its_path_and_the_reason(tmp_path: Path, data,
                                                                  message):
    path = write_key_file(tmp_path / "keys.json", data)
    with pytest.raises(KeyFileError, match=message) as err:
        load_key_file(path)
    assert str(err.value).startswith(str(path)) and GOOD not in str(err.value)


def test_hand_edited_key_file_last_entry_is_current(tmp_path: Path):
    k1, k2 = new_key("k1"), new_key("k2")
    entries = [{"session_id": k.session_id, "key": base64.b64encode(k.key).decode()}
               for k in (k1, k2)]
    path = write_key_file(tmp_path / "keys.json",
                          {"version": 1, "hoomis": {str(H).upper(): entries}})
    ring = load_key_file(path)
    assert ring.current(H) == k2 and ring.get(H, "k1") == k1


# scrypt with n = 2**15 costs ~0.1 s a derivation: few calls here.
def test_passphrase_key_is_the_same_for_every_member_and_differs_across_hoomis():
    a = key_from_passphrase("correct horse battery staple", H)
    assert a == key_from_passphrase("correct horse battery staple", H)
    assert a.session_id == "pw1"
    assert a.key != key_from_passphrase("correct horse battery staple", uuid4()).key
    assert a.key != key_from_passphrase("correct horse battery stapler", H).key


def test_passphrase_is_normalised_so_accents_typed_either_way_agree():
    composed, decomposed = "caf\u00e9 cr\u00e8me", "cafe\u0301 cre\u0300me"
    assert composed != decomposed
    h = uuid4()
    assert key_from_passphrase(composed, h, "v2") == key_from_passphrase(decomposed, h, "v2")


def test_empty_passphrase_is_refused():
    with pytest.raises(ValueError, match="passphrase"):
        key_from_passphrase("", H)


def test_messages_sealed_with_a_passphrase_key_open_for_another_member():
    # Derived once per "member" would double the cost; the equality above covers that.
    key = key_from_passphrase("shared", H)
    sealed = encrypt(key, H, ALICE, uuid4(), b"hi bob")
    ring = Keyring()
    ring.add(H, GroupKey(key.session_id, key.key))
    assert decrypt(ring, H, ALICE, sealed.content, sealed.nonce, "pw1").plaintext == b"hi bob"



# -- replays, as the SDK sees them -----------------------------------------------------------

def _pushed(sealed, hoomi_id, sender_id, seq: int):
    from hoomi_protocol import MessageBody
    return MessageBody(id=uuid4(), hoomi_id=hoomi_id, seq=seq, sender_id=sender_id,
                       content=sealed.content, nonce=sealed.nonce,
                       session_id=sealed.session_id, created_at=0)


def _reader():
    """A client that only opens messages, with one Hoomi's key: (client, hoomi, alice)."""
    from hoomi_client.sdk import HoomiClient
    h, alice = uuid4(), uuid4()
    ring = Keyring()
    ring.add(h, new_key("k1"))
    return HoomiClient("ws://unused", "token", keyring=ring), h, alice


def test_sdk_refuses_a_copy_of_a_message_served_again_under_a_new_seq():
    client, h, alice = _reader()
    sealed = encrypt(client.keyring.current(h), h, alice, uuid4(), b"pay bob 10")
    assert client.open(_pushed(sealed, h, alice, 5)).plaintext == b"pay bob 10"
    assert client.open(_pushed(sealed, h, alice, 5)).plaintext == b"pay bob 10"  # re-render
    for sender in (alice, None):  # also when the hub claims the sender was deleted
        with pytest.raises(DecryptError) as err:
            client.open(_pushed(sealed, h, sender, 9))
        assert err.value.reason == "replayed"
    other = encrypt(client.keyring.current(h), h, alice, uuid4(), b"pay bob 10")
    assert client.open(_pushed(other, h, alice, 10)).plaintext == b"pay bob 10"  # a new one


def test_sdk_keeps_the_lower_seq_as_the_original_whatever_order_it_opens_them():
    client, h, alice = _reader()
    sealed = encrypt(client.keyring.current(h), h, alice, uuid4(), b"hi")
    # History pages come newest first: the copy is met before the original.
    client.open(_pushed(sealed, h, alice, 9))
    assert client.open(_pushed(sealed, h, alice, 5)).plaintext == b"hi"
    with pytest.raises(DecryptError):
        client.open(_pushed(sealed, h, alice, 9))


# -- schemes (issue 10): scheme 2 compresses above a threshold; the scheme is authenticated --

@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000) | st.text(max_size=3000).map(str.encode), st.sampled_from([1, 2]))
def test_every_scheme_round_trips(plaintext: bytes, scheme: int) -> None:
    from hoomi_client.crypto import decrypt as open_
    from hoomi_client.crypto import encrypt as seal
    from hoomi_client.keys import GroupKey as Key
    key, h, sender, cmid = Key("k1", os.urandom(32)), uuid4(), uuid4(), uuid4()
    sealed = seal(key, h, sender, cmid, plaintext, scheme=scheme)
    assert sealed.scheme == scheme
    opened = open_(key, h, sender, sealed.content, sealed.nonce, "k1", scheme)
    assert (opened.plaintext, opened.client_msg_id) == (plaintext, cmid)


def test_scheme_2_compresses_long_text_and_the_scheme_cannot_be_relabelled() -> None:
    from hoomi_client.crypto import DecryptError as Refused
    from hoomi_client.crypto import decrypt as open_
    from hoomi_client.crypto import encrypt as seal
    from hoomi_client.keys import GroupKey as Key
    key, h, sender = Key("k1", os.urandom(32)), uuid4(), uuid4()
    log = b"\n".join(b"2026-12-01T12:00:%02d INFO writer batch committed" % i
                     for i in range(40))
    v1 = seal(key, h, sender, uuid4(), log, scheme=1)
    v2 = seal(key, h, sender, uuid4(), log, scheme=2)
    assert len(v2.content) < len(v1.content) / 3
    short = seal(key, h, sender, uuid4(), b"ok", scheme=2)
    assert len(short.content) == len(seal(key, h, sender, uuid4(), b"ok").content)
    for sealed, wrong in ((v1, 2), (v2, 1)):
        with pytest.raises(Refused) as err:
            open_(key, h, sender, sealed.content, sealed.nonce, "k1", wrong)
        assert err.value.reason == "tampered"
    with pytest.raises(Refused) as err:
        open_(key, h, sender, v2.content, v2.nonce, "k1", 3)
    assert err.value.reason == "malformed"
