"""docs/encryption.md must stay true: other clients are written from it, so its constants,
key file example and test vectors are checked here against the reference client."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import unicodedata
from pathlib import Path
from types import ModuleType
from uuid import UUID, uuid4

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hoomi_client import crypto, keys
from hoomi_protocol.limits import DEFAULT_LIMITS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "encryption.md").read_text()
MODULES: dict[str, ModuleType] = {"crypto": crypto, "keys": keys}
ROW = re.compile(r"^\| `(crypto|keys)\.(\w+)` \| `([^`]+)` \|", re.M)


def block(marker: str) -> str:
    """The body of the fenced block that follows `<!-- marker: ... -->`."""
    after = DOC.split(f"<!-- {marker}:", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def fields(marker: str) -> dict[str, str]:
    """A vector block as name -> value. A name starts a line; its value is the rest of
    the line plus the indented lines below, spaces removed, so long hex can wrap and be
    annotated after `#`."""
    out: dict[str, str] = {}
    name = ""
    for line in block(marker).splitlines():
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        if not line[0].isspace():
            name, tokens = tokens[0], tokens[1:]
            assert name not in out, f"{marker}: {name} given twice"
            out[name] = ""
        out[name] += "".join(tokens)
    return out


def documented() -> dict[str, object]:
    return {f"{module}.{name}": ast.literal_eval(value)
            for module, name, value in ROW.findall(DOC)}


def test_constants_table_matches_the_code_and_lists_every_constant() -> None:
    table = documented()
    for qualified, value in table.items():
        module, name = qualified.split(".")
        assert getattr(MODULES[module], name) == value, qualified
    # A new constant is a new fact about the format: the table must say it too.
    public = {f"{module}.{name}" for module, mod in MODULES.items()
              for name, value in vars(mod).items()
              if name.isupper() and not name.startswith("_")
              and type(value) in (int, bytes, str)}
    assert public == set(table), public ^ set(table)


def test_claims_about_the_hub_limits_hold() -> None:
    # The doc says the hub takes exactly these sizes; a drift would mean refused sends.
    assert crypto.NONCE_BYTES == DEFAULT_LIMITS.nonce_bytes
    assert crypto.TAG_BYTES == DEFAULT_LIMITS.min_content_bytes
    assert crypto.MAX_CONTENT == DEFAULT_LIMITS.max_content_bytes
    assert keys.MAX_SESSION_ID_CHARS == DEFAULT_LIMITS.max_session_id_chars
    assert crypto.HEADER_BYTES == 1 + 16 + 16 + 4


def test_maximum_plaintext_arithmetic_in_the_doc_is_the_codes() -> None:
    formula = re.search(r"`MAX_PLAINTEXT = \(M - (\d+)\) // (\d+) \* (\d+) - (\d+)`", DOC)
    assert formula, "the general MAX_PLAINTEXT formula is missing"
    assert [int(g) for g in formula.groups()] == [
        crypto.TAG_BYTES, crypto.PAD_TO, crypto.PAD_TO, crypto.HEADER_BYTES]
    envelope = (crypto.MAX_CONTENT - crypto.TAG_BYTES) // crypto.PAD_TO * crypto.PAD_TO
    assert crypto.MAX_PLAINTEXT == envelope - crypto.HEADER_BYTES
    section = DOC.split("### Maximum plaintext size", 1)[1].split("\n## ", 1)[0]
    quoted = {int(n) for n in re.findall(r"\b\d{4,}\b", section)}
    assert quoted == {crypto.MAX_CONTENT, crypto.MAX_CONTENT - crypto.TAG_BYTES, envelope,
                      crypto.MAX_PLAINTEXT, envelope + crypto.TAG_BYTES}, quoted


def test_padding_sizes_quoted_in_the_doc_are_what_encrypt_gives() -> None:
    claim = re.search(r"Every body of 0 to (\d+) bytes gives a (\d+)-byte envelope\s+and an "
                      r"(\d+)-byte `content`; (\d+) bytes gives (\d+) and (\d+)", DOC)
    assert claim, "the padding example is missing"
    last_small, envelope, content, first_big, big_envelope, big_content = map(
        int, claim.groups())
    key, h = keys.new_key("k1"), uuid4()
    sizes = {n: len(crypto.encrypt(key, h, h, h, bytes(n)).content)
             for n in (0, last_small, first_big)}
    assert sizes == {0: content, last_small: content, first_big: big_content}
    assert (envelope, big_envelope) == (content - crypto.TAG_BYTES,
                                        big_content - crypto.TAG_BYTES)
    assert first_big == last_small + 1


def test_scrypt_parameters_quoted_in_the_doc_are_the_codes() -> None:
    recipe = re.search(r"N = (\d+) \(2\^(\d+)\), r = (\d+), p = (\d+), "
                       r"output length = (\d+) bytes", DOC)
    assert recipe, "the scrypt recipe is missing"
    n, log2_n, r, p, length = map(int, recipe.groups())
    assert (n, 2**log2_n, r, p, length) == (keys.SCRYPT_N, keys.SCRYPT_N, keys.SCRYPT_R,
                                            keys.SCRYPT_P, keys.KEY_BYTES)
    memory = re.search(r"128 · N · r = (\d+) MiB", DOC)
    assert memory and int(memory.group(1)) * 2**20 == 128 * keys.SCRYPT_N * keys.SCRYPT_R
    assert '"hoomi/v1/" (9 bytes, ASCII) | hoomi_id (16 bytes)' in DOC
    assert keys.PASSPHRASE_SALT_PREFIX == b"hoomi/v1/"


def test_message_vector_is_what_the_code_seals_and_opens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    v = fields("message-vector")
    key = keys.GroupKey(v["session_id"], bytes.fromhex(v["key"]))
    hoomi, sender, cmid = UUID(v["hoomi_id"]), UUID(v["sender_id"]), UUID(v["client_msg_id"])
    nonce, body = bytes.fromhex(v["nonce"]), bytes.fromhex(v["body"])
    ad, envelope, content = (bytes.fromhex(v[k]) for k in ("ad", "envelope", "content"))

    # The intermediate dumps are the real ones: the doc's AD opens the code's content
    # into the doc's envelope.
    assert ad == crypto.AD_PREFIX + hoomi.bytes + key.session_id.encode()
    assert AESGCM(key.key).decrypt(nonce, content, ad) == envelope

    def fixed_nonce(size: int) -> bytes:
        assert size == len(nonce) == crypto.NONCE_BYTES
        return nonce

    # encrypt() draws its nonce from os.urandom and takes no nonce argument.
    with monkeypatch.context() as patch:
        patch.setattr(crypto.os, "urandom", fixed_nonce)
        sealed = crypto.encrypt(key, hoomi, sender, cmid, body)
    assert sealed == crypto.Sealed(content, nonce, key.session_id)
    assert f"`content` ({len(content)} bytes)" in DOC

    for reported in (sender, None):
        opened = crypto.decrypt(key, hoomi, reported, content, nonce, key.session_id)
        assert (opened.plaintext, opened.client_msg_id) == (body, cmid)
    with pytest.raises(crypto.DecryptError) as err:
        crypto.decrypt(key, hoomi, cmid, content, nonce, key.session_id)
    assert err.value.reason == "tampered"


def test_key_file_example_loads_with_its_last_entry_current(tmp_path: Path) -> None:
    text = block("key-file-example")
    path = tmp_path / "keys.json"
    path.write_text(text)
    path.chmod(0o600)
    ring = keys.load_key_file(path)
    [(raw_hoomi, entries)] = json.loads(text)["hoomis"].items()
    hoomi = UUID(raw_hoomi)
    names = [e["session_id"] for e in entries]
    assert [k.session_id for k in ring.keys_of(hoomi)] == names
    assert ring.current(hoomi).session_id == names[-1]
    # The doc says the first entry holds the message vector's key, and the second is
    # named as add_key names a rotation.
    assert ring.get(hoomi, names[0]) == keys.GroupKey(
        "k1", bytes.fromhex(fields("message-vector")["key"]))
    assert re.fullmatch(r"k2-[0-9a-f]{8}", names[1])


def test_passphrase_vector_is_what_the_code_derives() -> None:
    v = fields("passphrase-vector")
    composed = bytes.fromhex(v["passphrase"]).decode("utf-8")
    decomposed = bytes.fromhex(v["decomposed"]).decode("utf-8")
    hoomi, salt, key = UUID(v["hoomi_id"]), bytes.fromhex(v["salt"]), bytes.fromhex(v["key"])
    assert composed != decomposed == unicodedata.normalize("NFD", composed)
    assert unicodedata.normalize("NFC", decomposed) == composed
    assert salt == keys.PASSPHRASE_SALT_PREFIX + hoomi.bytes

    # The recipe as documented, run through hashlib rather than hoomi_client.keys, gives the
    # vector. OpenSSL's default 32 MiB memory cap is too small for these parameters.
    table = documented()
    n, r, p = (table[f"keys.SCRYPT_{x}"] for x in "NRP")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    assert hashlib.scrypt(composed.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          dklen=len(key), maxmem=2 * 128 * n * r) == key

    # scrypt costs ~0.1 s a derivation: one per spelling.
    for spelling in (composed, decomposed):
        assert keys.key_from_passphrase(spelling, hoomi) == keys.GroupKey(
            keys.PASSPHRASE_SESSION, key)
