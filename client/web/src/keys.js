// Group keys for the browser: a keyring per (Hoomi, session_id), key files (JSON, as
// docs/encryption.md "Key file" and client/keys.py) and passphrase keys (scrypt N=2^15,
// r=8, p=1, salt "hoomi/v1/" | hoomi_id). WebCrypto has no scrypt, so @noble/hashes'
// audited scrypt derives the bytes, which go straight into a non-extractable CryptoKey.

import { scryptAsync } from "@noble/hashes/scrypt.js";

import { GroupKey, checkSessionId, uuidBytes } from "./crypto.js";

export const SCRYPT_N = 32768;
export const SCRYPT_R = 8;
export const SCRYPT_P = 1;
export const PASSPHRASE_SALT_PREFIX = new TextEncoder().encode("hoomi/v1/");
export const PASSPHRASE_SESSION = "pw1";
export const KEY_FILE_VERSION = 1;

export class KeyFileError extends Error {
  constructor(message) {
    super(message);
    this.name = "KeyFileError";
  }
}

/** Keys per Hoomi, oldest first; the last added is the Hoomi's current key. */
export class Keyring {
  constructor() {
    this._keys = new Map(); // hoomi_id -> GroupKey[]
  }

  add(hoomiId, key) {
    uuidBytes(hoomiId);
    const list = this._keys.get(hoomiId) ?? [];
    const same = list.findIndex((k) => k.sessionId === key.sessionId);
    if (same >= 0) {
      if (list[same].fingerprint !== key.fingerprint) {
        throw new KeyFileError(`session_id '${key.sessionId}': another key already has this name`);
      }
      list.splice(same, 1); // the same key again: it becomes current
    }
    list.push(key);
    this._keys.set(hoomiId, list);
  }

  get(hoomiId, sessionId) {
    return (this._keys.get(hoomiId) ?? []).find((k) => k.sessionId === sessionId) ?? null;
  }

  current(hoomiId) {
    const list = this._keys.get(hoomiId);
    return list && list.length ? list[list.length - 1] : null;
  }

  hoomis() {
    return [...this._keys.keys()];
  }

  keysOf(hoomiId) {
    return [...(this._keys.get(hoomiId) ?? [])];
  }

  toString() {
    return `Keyring(${this._keys.size} hoomis)`;
  }
}

/** Derive a Hoomi's key from the passphrase its members share. */
export async function keyFromPassphrase(passphrase, hoomiId, sessionId = PASSPHRASE_SESSION) {
  if (typeof passphrase !== "string" || passphrase.length === 0) {
    throw new RangeError("passphrase: must not be empty");
  }
  const raw = await passphraseBytes(passphrase, hoomiId);
  try {
    return await GroupKey.fromBytes(sessionId, raw);
  } finally {
    raw.fill(0);
  }
}

/** The 32 raw bytes of a passphrase key (for the test vectors; prefer keyFromPassphrase). */
export async function passphraseBytes(passphrase, hoomiId) {
  const secret = new TextEncoder().encode(passphrase.normalize("NFC"));
  const salt = new Uint8Array(PASSPHRASE_SALT_PREFIX.length + 16);
  salt.set(PASSPHRASE_SALT_PREFIX, 0);
  salt.set(uuidBytes(hoomiId), PASSPHRASE_SALT_PREFIX.length);
  return scryptAsync(secret, salt, { N: SCRYPT_N, r: SCRYPT_R, p: SCRYPT_P, dkLen: 32,
    maxmem: 64 * 1024 * 1024 });
}

const B64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function fromBase64(text) {
  if (!B64_RE.test(text)) return null;
  const bin = atob(text);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

/** Parse a key file's text into a Keyring; refuses the whole file, naming the entry but
 * never a key, exactly where client/keys.py does. `name` is the file's name for messages. */
export async function parseKeyFile(text, name = "key file") {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new KeyFileError(`${name}: not JSON`);
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)
      || data.version !== KEY_FILE_VERSION || data.hoomis === null
      || typeof data.hoomis !== "object" || Array.isArray(data.hoomis)) {
    throw new KeyFileError(`${name}: not a version 1 Hoomi key file ({"version": 1, "hoomis": {...}})`);
  }
  const ring = new Keyring();
  for (const [rawHoomi, entries] of Object.entries(data.hoomis)) {
    const where = `${name}: hoomi '${rawHoomi}'`;
    const hoomiId = rawHoomi.toLowerCase();
    try {
      uuidBytes(hoomiId);
    } catch {
      throw new KeyFileError(`${where}: not a UUID`);
    }
    if (!Array.isArray(entries)) throw new KeyFileError(`${where}: expected a list of keys`);
    for (const [i, entry] of entries.entries()) {
      const at = `${where}, key ${i + 1}`;
      if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
        throw new KeyFileError(`${at}: expected an object with session_id and key`);
      }
      if (typeof entry.session_id !== "string") throw new KeyFileError(`${at}: session_id must be a string`);
      if (typeof entry.key !== "string") throw new KeyFileError(`${at}: key must be a base64 string`);
      try {
        checkSessionId(entry.session_id);
      } catch (err) {
        throw new KeyFileError(`${at}: ${err.message}`);
      }
      const raw = fromBase64(entry.key);
      if (raw === null) throw new KeyFileError(`${at}: key is not valid base64`);
      if (raw.length !== 32) throw new KeyFileError(`${at}: key must be exactly 32 bytes`);
      const key = await GroupKey.fromBytes(entry.session_id, raw);
      raw.fill(0);
      try {
        ring.add(hoomiId, key);
      } catch (err) {
        throw new KeyFileError(`${at}: ${err.message}`);
      }
    }
  }
  return ring;
}
