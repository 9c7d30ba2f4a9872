"""Group keys, held by the client only: a 256-bit AES key per Hoomi and key session.

A `session_id` names one key of a Hoomi (an epoch: rotating the key starts a new
session). It travels with every message so a reader knows which key opens it; the
server stores it but never sees a key.

Two sources of keys:
- a key file (JSON, mode 0600, refused if group- or world-readable, like ssh keys):
  `{"version": 1, "hoomis": {"<hoomi uuid>": [{"session_id": "k1", "key": "<base64>"}]}}`,
  the last entry of a Hoomi being its current key;
- a passphrase shared out of band: scrypt(passphrase, salt = b"hoomi/v1/" + hoomi_id
  bytes, n = 2**15, r = 8, p = 1, 32 bytes). Every member with the passphrase derives the
  same key for that Hoomi, and different Hoomis get unrelated keys. n = 2**15 costs about
  32 MiB and ~0.1 s per derivation: affordable once per Hoomi on a client, expensive for
  someone guessing passphrases offline.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

KEY_BYTES = 32
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
PASSPHRASE_SESSION = "pw1"


class KeyFileError(Exception):
    """A key file or key that cannot be used; the message says why."""


@dataclass(frozen=True)
class GroupKey:
    session_id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise KeyFileError(f"a group key is {KEY_BYTES} bytes, not {len(self.key)}")
        if not 0 < len(self.session_id) <= 128 or "\x00" in self.session_id:
            raise KeyFileError("session_id: 1 to 128 characters, no NUL")

    def __repr__(self) -> str:
        return f"GroupKey(session_id={self.session_id!r}, key=<hidden>)"


class Keyring:
    """Keys by (hoomi, session); the newest key of a Hoomi is the one used to encrypt."""

    def __init__(self) -> None:
        self._keys: dict[tuple[UUID, str], GroupKey] = {}
        self._current: dict[UUID, GroupKey] = {}

    def add(self, hoomi_id: UUID, key: GroupKey) -> None:
        self._keys[(hoomi_id, key.session_id)] = key
        self._current[hoomi_id] = key

    def current(self, hoomi_id: UUID) -> GroupKey:
        try:
            return self._current[hoomi_id]
        except KeyError:
            raise KeyFileError(f"no key for hoomi {hoomi_id}") from None

    def get(self, hoomi_id: UUID, session_id: str) -> GroupKey | None:
        return self._keys.get((hoomi_id, session_id))

    def hoomis(self) -> list[UUID]:
        return list(self._current)


def new_key(session_id: str | None = None) -> GroupKey:
    return GroupKey(session_id or os.urandom(6).hex(), os.urandom(KEY_BYTES))


def key_from_passphrase(passphrase: str, hoomi_id: UUID,
                        session_id: str = PASSPHRASE_SESSION) -> GroupKey:
    kdf = Scrypt(salt=b"hoomi/v1/" + hoomi_id.bytes, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R,
                 p=SCRYPT_P)
    return GroupKey(session_id, kdf.derive(passphrase.encode("utf-8")))


def _write_new(path: Path, data: dict[str, object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)


def _read(path: Path) -> dict[str, object]:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: permissions {oct(mode & 0o777)} are too open; "
                        f"run `chmod 600 {path}`")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise KeyFileError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(
            data.get("hoomis"), dict):
        raise KeyFileError(f"{path}: not a version 1 Hoomi key file")
    return data


def generate_key_file(path: Path, hoomi_ids: list[UUID]) -> Keyring:
    """Write a new key file (mode 0600, never overwriting) with one fresh key per Hoomi."""
    ring = Keyring()
    hoomis: dict[str, list[dict[str, str]]] = {}
    for h in hoomi_ids:
        key = new_key("k1")
        ring.add(h, key)
        hoomis[str(h)] = [{"session_id": key.session_id,
                           "key": base64.b64encode(key.key).decode()}]
    _write_new(path, {"version": 1, "hoomis": hoomis})
    return ring


def load_key_file(path: Path) -> Keyring:
    data = _read(path)
    ring = Keyring()
    hoomis = data["hoomis"]
    assert isinstance(hoomis, dict)
    for raw_h, entries in hoomis.items():
        try:
            h = UUID(raw_h)
            for e in entries:
                ring.add(h, GroupKey(str(e["session_id"]), base64.b64decode(e["key"],
                                                                            validate=True)))
        except (ValueError, TypeError, KeyError) as exc:
            raise KeyFileError(f"{path}: bad entry for {raw_h}: {type(exc).__name__}") from None
    return ring


def add_key(path: Path, hoomi_id: UUID, session_id: str | None = None) -> GroupKey:
    """Rotate: append a fresh key for a Hoomi; it becomes the current one."""
    data = _read(path)
    hoomis = data["hoomis"]
    assert isinstance(hoomis, dict)
    entries = hoomis.setdefault(str(hoomi_id), [])
    key = new_key(session_id or f"k{len(entries) + 1}")
    entries.append({"session_id": key.session_id, "key": base64.b64encode(key.key).decode()})
    tmp = path.with_suffix(path.suffix + ".tmp")
    _write_new(tmp, data)
    os.replace(tmp, path)
    return key


def add_hoomi_key(path: Path, hoomi_id: UUID, key: GroupKey) -> None:
    """Store a key received out of band (e.g. from another member) in a key file."""
    data = _read(path) if path.exists() else {"version": 1, "hoomis": {}}
    hoomis = data["hoomis"]
    assert isinstance(hoomis, dict)
    hoomis.setdefault(str(hoomi_id), []).append(
        {"session_id": key.session_id, "key": base64.b64encode(key.key).decode()})
    tmp = path.with_suffix(path.suffix + ".tmp")
    _write_new(tmp, data)
    os.replace(tmp, path)
