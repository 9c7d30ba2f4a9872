"""Group keys, held by the client only: a 256-bit AES key per Hoomi and key session.

A `session_id` names one key of a Hoomi (an epoch: rotating the key starts a new
session). It travels with every message so a reader knows which key opens it; the
server stores it but never sees a key. Invariant of a `Keyring`: one (Hoomi, session_id)
names exactly one key, so a reader never has to guess; adding a different key under a
name already taken is refused.

Two sources of keys:
- a key file (JSON, human-editable, mode 0600; refused if group or others may read or
  write it, as ssh refuses a private key):
  `{"version": 1, "hoomis": {"<hoomi uuid>": [{"session_id": "k1", "key": "<base64>"}]}}`,
  the last entry of a Hoomi being its current key (the one new messages are sealed with);
- a passphrase shared out of band: scrypt(NFC(passphrase) as UTF-8,
  salt = b"hoomi/v1/" + hoomi_id (16 bytes), n = 2**15, r = 8, p = 1, 32 bytes). Every
  member with the passphrase derives the same key for that Hoomi; different Hoomis get
  unrelated keys, so one passphrase does not open two Hoomis with one derivation.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import stat
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from hoomi_protocol.limits import DEFAULT_LIMITS

KEY_BYTES = 32  # AES-256
MAX_SESSION_ID_CHARS = DEFAULT_LIMITS.max_session_id_chars  # what the hub accepts
KEY_FILE_VERSION = 1

# scrypt's cost. Memory is 128 * n * r bytes = 32 MiB and one derivation takes ~0.08 s
# (measured 2026-11-25 on a 2-core VM, best of 5: 2**14 0.037 s, 2**15 0.078 s, 2**16
# 0.160 s: time doubles with n, as it should). A client derives
# once per Hoomi at start-up, so this is affordable; someone guessing a shared
# passphrase offline pays the same per guess, in memory that GPUs do not parallelise
# cheaply. Percival's interactive setting was n = 2**14; we double it because nobody
# waits on this in a login loop. r = 8 is scrypt's standard block size; p = 1 because
# OpenSSL runs the p lanes one after another: a larger p only costs time, and spending
# that time on a larger n buys more memory-hardness.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
PASSPHRASE_SALT_PREFIX = b"hoomi/v1/"
PASSPHRASE_SESSION = "pw1"


class KeyFileError(ValueError):
    """A key file or a key that cannot be used; the message says why and never holds
    key material."""


@dataclass(frozen=True)
class GroupKey:
    """One 32-byte AES-256-GCM key of a Hoomi, named by its session_id. Its repr and str
    hide the key."""

    session_id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            size = len(self.key) if isinstance(self.key, bytes) else type(self.key).__name__
            raise KeyFileError(f"a group key is {KEY_BYTES} bytes, not {size}")
        if (not isinstance(self.session_id, str)
                or not 0 < len(self.session_id) <= MAX_SESSION_ID_CHARS
                or "\x00" in self.session_id):
            raise KeyFileError(f"session_id: 1 to {MAX_SESSION_ID_CHARS} characters, no NUL")

    def __repr__(self) -> str:
        return f"GroupKey(session_id={self.session_id!r}, key=<hidden>)"


class Keyring:
    """Keys by (Hoomi, session_id) for reading; per Hoomi, the key most recently added is
    the current one, used for sending."""

    def __init__(self) -> None:
        self._keys: dict[tuple[UUID, str], GroupKey] = {}
        self._current: dict[UUID, GroupKey] = {}

    def add(self, hoomi_id: UUID, key: GroupKey) -> None:
        """Add a key and make it the Hoomi's current one. Adding the same key again is
        harmless; a different key under a session_id already taken is refused."""
        known = self._keys.get((hoomi_id, key.session_id))
        if known is not None and not hmac.compare_digest(known.key, key.key):
            raise KeyFileError(f"hoomi {hoomi_id} already has a different key named "
                               f"{key.session_id!r}")
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

    def keys_of(self, hoomi_id: UUID) -> list[GroupKey]:
        """The Hoomi's keys, oldest first, the current one last."""
        current = self._current.get(hoomi_id)
        older = [k for (h, _), k in self._keys.items() if h == hoomi_id and k != current]
        return older + [current] if current is not None else older

    def __repr__(self) -> str:
        return f"Keyring({len(self._keys)} keys, {len(self._current)} hoomis)"


def new_key(session_id: str | None = None) -> GroupKey:
    """A fresh random key; without a session_id, a random one names it."""
    return GroupKey(session_id or os.urandom(6).hex(), os.urandom(KEY_BYTES))


def key_from_passphrase(passphrase: str, hoomi_id: UUID,
                        session_id: str = PASSPHRASE_SESSION) -> GroupKey:
    """The Hoomi's key derived from a passphrase its members share: scrypt with n = 2**15,
    r = 8, p = 1 (32 MiB, ~0.08 s), salt b"hoomi/v1/" + hoomi_id.bytes, 32-byte output.

    The passphrase is NFC-normalised first, so members typing the same accented text on
    different systems derive the same key. Deterministic per (passphrase, Hoomi): every
    member gets the same key, and another Hoomi gets another key.
    """
    if not passphrase:
        raise ValueError("passphrase: must not be empty")
    kdf = Scrypt(salt=PASSPHRASE_SALT_PREFIX + hoomi_id.bytes, length=KEY_BYTES, n=SCRYPT_N,
                 r=SCRYPT_R, p=SCRYPT_P)
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return GroupKey(session_id, kdf.derive(secret))


# -- key files ---------------------------------------------------------------------------

def _encode(ring: Keyring) -> dict[str, Any]:
    """The JSON document for a keyring; each Hoomi's entries end with its current key."""
    hoomis: dict[str, list[dict[str, str]]] = {}
    for hoomi_id in ring.hoomis():
        hoomis[str(hoomi_id)] = [{"session_id": k.session_id,
                                  "key": base64.b64encode(k.key).decode("ascii")}
                                 for k in ring.keys_of(hoomi_id)]
    return {"version": KEY_FILE_VERSION, "hoomis": hoomis}


def _decode_entry(entry: object, where: str) -> GroupKey:
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where}: expected an object with session_id and key")
    session_id, key = entry.get("session_id"), entry.get("key")
    if not isinstance(session_id, str):
        raise KeyFileError(f"{where}: session_id must be a string")
    if not isinstance(key, str):
        raise KeyFileError(f"{where}: key must be a base64 string")
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raise KeyFileError(f"{where}: key is not valid base64") from None
    try:
        return GroupKey(session_id, raw)
    except KeyFileError as err:
        raise KeyFileError(f"{where}: {err}") from None


def _decode(path: Path, data: object) -> Keyring:
    if (not isinstance(data, dict) or data.get("version") != KEY_FILE_VERSION
            or not isinstance(data.get("hoomis"), dict)):
        raise KeyFileError(f"{path}: not a version {KEY_FILE_VERSION} Hoomi key file "
                           '({"version": 1, "hoomis": {...}})')
    ring = Keyring()
    for raw_hoomi, entries in data["hoomis"].items():
        where = f"{path}: hoomi {raw_hoomi!r}"
        try:
            hoomi_id = UUID(raw_hoomi)
        except ValueError:
            raise KeyFileError(f"{where}: not a UUID") from None
        if not isinstance(entries, list):
            raise KeyFileError(f"{where}: expected a list of keys")
        for i, entry in enumerate(entries, 1):
            key = _decode_entry(entry, f"{where}, key {i}")
            try:
                ring.add(hoomi_id, key)
            except KeyFileError as err:
                raise KeyFileError(f"{where}, key {i}: {err}") from None
    return ring


def _read(path: Path) -> Keyring:
    # Check the mode of the file we actually read (fstat on the open descriptor), not of
    # whatever the path named a moment earlier.
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open: group "
                f"and others must have no access to group keys; run `chmod 600 {path}`")
        raw = f.read()
    try:
        data = json.loads(raw)
    except ValueError:
        raise KeyFileError(f"{path}: not valid JSON") from None
    return _decode(path, data)


def _dump(ring: Keyring) -> bytes:
    return (json.dumps(_encode(ring), indent=2) + "\n").encode("utf-8")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path, ring: Keyring) -> None:
    """Write a new file, mode 0600 from its creation (O_EXCL: never over an existing one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_dump(ring))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _replace(path: Path, ring: Keyring) -> None:
    """Rewrite atomically: a crash leaves the old file or the new one, never half of one.
    mkstemp creates the temporary file with mode 0600 and a fresh name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_dump(ring))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def generate_key_file(path: str | os.PathLike[str], hoomi_ids: Iterable[UUID]) -> Keyring:
    """Write a new key file (mode 0600) with one fresh key per Hoomi, session
    "k1-<8 random hex>", and return its keyring. FileExistsError if the file exists:
    keys are never overwritten.

    The random part gives two key files made apart (two members each running
    `hoomi keys`) different names for their different keys, so a reader holding the
    other file is told "no key for this message's key id" rather than a tag failure,
    which AES-GCM cannot tell from tampering.
    """
    ring = Keyring()
    for hoomi_id in dict.fromkeys(hoomi_ids):
        ring.add(hoomi_id, new_key(f"k1-{os.urandom(4).hex()}"))
    _create(Path(path), ring)
    return ring


def load_key_file(path: str | os.PathLike[str]) -> Keyring:
    """The keyring in a key file. KeyFileError if the file is readable or writable by
    group or others, or is not a valid version 1 key file."""
    return _read(Path(path))


def add_key(path: str | os.PathLike[str], hoomi_id: UUID,
            session_id: str | None = None) -> GroupKey:
    """Rotate: append a fresh key for a Hoomi to a key file; it becomes the current key,
    and the older ones stay so older messages still open. Share the file (or the new
    entry) with the Hoomi's members out of band.

    The default session_id is "k<n>-<8 random hex>": the counter reads well, and the
    random part keeps two members who rotate independently from minting the same name
    for different keys (which readers could only report as "wrong key or tampered").
    """
    file = Path(path)
    ring = _read(file)
    taken = {k.session_id for k in ring.keys_of(hoomi_id)}
    if session_id is None:
        session_id = f"k{len(taken) + 1}-{os.urandom(4).hex()}"
    elif session_id in taken:
        raise KeyFileError(f"{file}: hoomi {hoomi_id} already has a key named {session_id!r}")
    key = new_key(session_id)
    ring.add(hoomi_id, key)
    _replace(file, ring)
    return key


def add_hoomi_key(path: str | os.PathLike[str], hoomi_id: UUID, key: GroupKey) -> None:
    """Store a key received out of band (e.g. from another member) in a key file, created
    if missing; it becomes the Hoomi's current key. KeyFileError if the file already
    names a different key with that session_id."""
    file = Path(path)
    try:
        ring = _read(file)
    except FileNotFoundError:
        ring = Keyring()
        ring.add(hoomi_id, key)
        _create(file, ring)
        return
    ring.add(hoomi_id, key)
    _replace(file, ring)
