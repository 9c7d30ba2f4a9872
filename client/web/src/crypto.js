// End-to-end encryption, version 1: exactly the envelope of docs/encryption.md, sealed and
// opened with WebCrypto's AES-256-GCM (globalThis.crypto.subtle: browsers, Node >= 20).
// Mirrors client/crypto.py: the same constants, the same checks in the same order, the
// same three failure reasons. Never puts key bytes or plaintext in an error message.

export const VERSION = 1;
export const AD_PREFIX = new TextEncoder().encode("hoomi/v1");
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const PAD_TO = 32;
export const HEADER_BYTES = 37;
export const MAX_CONTENT = 65536;
export const MAX_PLAINTEXT = maxPlaintext(MAX_CONTENT);
export const KEY_BYTES = 32;
export const MAX_SESSION_ID_CHARS = 128;

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** The largest body whose sealed `content` fits in `maxContent` bytes. */
export function maxPlaintext(maxContent) {
  const envelope = Math.floor((maxContent - TAG_BYTES) / PAD_TO) * PAD_TO;
  return envelope - HEADER_BYTES;
}

/** Why a message did not open: "unknown_session", "malformed", "tampered" (or, from
 * HoomiClient.open, "replayed"). `summary` is what a chat shows. */
export class DecryptError extends Error {
  constructor(reason, detail = "", summary = "") {
    super(detail ? `${reason}: ${detail}` : reason);
    this.name = "DecryptError";
    this.reason = reason;
    this.detail = detail;
    this.summary = summary || defaultSummary(reason, detail);
  }
}

function defaultSummary(reason, detail) {
  if (reason === "tampered") return "(cannot decrypt: wrong key or tampered)";
  if (reason === "replayed") return "(cannot decrypt: a replayed copy of an earlier message)";
  return `(cannot decrypt: ${detail || reason})`;
}

/** A canonical lowercase UUID string -> its 16 bytes (RFC 4122 order, as Python's UUID.bytes). */
export function uuidBytes(id) {
  if (typeof id !== "string" || !UUID_RE.test(id)) {
    throw new TypeError(`not a canonical lowercase UUID: ${String(id).slice(0, 40)}`);
  }
  const hex = id.replaceAll("-", "");
  const out = new Uint8Array(16);
  for (let i = 0; i < 16; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function uuidString(bytes) {
  const h = toHex(bytes);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function fromHex(hex) {
  const clean = hex.replace(/\s+/g, "");
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** A random version-4 UUID (crypto.randomUUID where available). */
export function newUuid() {
  if (typeof globalThis.crypto.randomUUID === "function") return globalThis.crypto.randomUUID();
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return uuidString(b);
}

/** session_id rules of docs/encryption.md: 1-128 code points, no NUL. */
export function checkSessionId(sessionId) {
  if (typeof sessionId !== "string") throw new TypeError("session_id: must be a string");
  const chars = [...sessionId].length;
  if (chars < 1 || chars > MAX_SESSION_ID_CHARS) {
    throw new RangeError(`session_id: must be 1 to ${MAX_SESSION_ID_CHARS} characters`);
  }
  if (sessionId.includes("\0")) throw new RangeError("session_id: must not contain NUL");
}

/** AD = "hoomi/v1" | hoomi_id (16) | UTF-8(session_id). */
export function associatedData(hoomiId, sessionId) {
  const sid = new TextEncoder().encode(sessionId);
  const ad = new Uint8Array(AD_PREFIX.length + 16 + sid.length);
  ad.set(AD_PREFIX, 0);
  ad.set(uuidBytes(hoomiId), AD_PREFIX.length);
  ad.set(sid, AD_PREFIX.length + 16);
  return ad;
}

function padded(size) {
  return Math.ceil(size / PAD_TO) * PAD_TO;
}

/** The padded envelope (the plaintext AES-GCM encrypts). */
export function envelope(clientMsgId, senderId, body) {
  const env = new Uint8Array(padded(HEADER_BYTES + body.length));
  env[0] = VERSION;
  env.set(uuidBytes(clientMsgId), 1);
  env.set(uuidBytes(senderId), 17);
  new DataView(env.buffer).setUint32(33, body.length, false);
  env.set(body, HEADER_BYTES);
  return env;
}

/** A group key: 32 bytes under a session_id. `cryptoKey` is a non-extractable AES-GCM key. */
export class GroupKey {
  constructor(sessionId, cryptoKey, fingerprint) {
    this.sessionId = sessionId;
    this.cryptoKey = cryptoKey;
    this.fingerprint = fingerprint; // SHA-256 of the key bytes, to compare keys only
  }

  /** Import 32 raw bytes (non-extractable: the key never leaves WebCrypto again). */
  static async fromBytes(sessionId, bytes) {
    checkSessionId(sessionId);
    if (!(bytes instanceof Uint8Array) || bytes.length !== KEY_BYTES) {
      throw new RangeError(`key: must be exactly ${KEY_BYTES} bytes`);
    }
    const subtle = globalThis.crypto.subtle;
    const cryptoKey = await subtle.importKey("raw", bytes, { name: "AES-GCM" }, false,
      ["encrypt", "decrypt"]);
    const fingerprint = toHex(new Uint8Array(await subtle.digest("SHA-256", bytes)));
    return new GroupKey(sessionId, cryptoKey, fingerprint);
  }

  toString() {
    return `GroupKey(${this.sessionId})`;
  }
}

function bodyBytes(body) {
  if (typeof body === "string") return new TextEncoder().encode(body);
  if (body instanceof Uint8Array) return body;
  throw new TypeError("body: must be a string or a Uint8Array");
}

/**
 * Seal `body` for `hoomiId` as `senderId` under `key`. Returns {content, nonce, sessionId,
 * clientMsgId}. `nonce` may be given only by tests (the vectors); otherwise it is drawn
 * fresh from crypto.getRandomValues for every message.
 */
export async function encrypt(key, hoomiId, senderId, clientMsgId, body, opts = {}) {
  const data = bodyBytes(body);
  const limit = opts.maxPlaintext ?? MAX_PLAINTEXT;
  if (data.length > limit) {
    throw new RangeError(`body: ${data.length} bytes, over the ${limit} bytes a message can hold`);
  }
  const nonce = opts.nonce ?? globalThis.crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
  if (nonce.length !== NONCE_BYTES) throw new RangeError("nonce: must be exactly 12 bytes");
  const sealed = await globalThis.crypto.subtle.encrypt(
    { name: "AES-GCM", iv: nonce, additionalData: associatedData(hoomiId, key.sessionId),
      tagLength: 128 },
    key.cryptoKey, envelope(clientMsgId, senderId, data));
  return { content: new Uint8Array(sealed), nonce, sessionId: key.sessionId, clientMsgId };
}

/**
 * Open a message as the hub delivered it; `senderId` is the hub's (null for a deleted
 * sender). `keys` is a Keyring or a single GroupKey. Returns {body (Uint8Array),
 * clientMsgId, senderId (the envelope's)} or throws DecryptError; the checks run in the
 * order of docs/encryption.md and the first that fails decides the reason.
 */
export async function decrypt(keys, hoomiId, senderId, content, nonce, sessionId) {
  const key = keys instanceof GroupKey
    ? (keys.sessionId === sessionId ? keys : null)
    : keys.get(hoomiId, sessionId);
  if (!key) {
    throw new DecryptError("unknown_session", `no key for this message's key id '${sessionId}'`);
  }
  if (!(nonce instanceof Uint8Array) || nonce.length !== NONCE_BYTES) {
    throw new DecryptError("malformed", "nonce: must be exactly 12 bytes");
  }
  if (!(content instanceof Uint8Array) || content.length < TAG_BYTES) {
    throw new DecryptError("malformed", "content: shorter than the 16-byte tag");
  }
  let env;
  try {
    env = new Uint8Array(await globalThis.crypto.subtle.decrypt(
      { name: "AES-GCM", iv: nonce, additionalData: associatedData(hoomiId, sessionId),
        tagLength: 128 },
      key.cryptoKey, content));
  } catch {
    throw new DecryptError("tampered", "authentication failed");
  }
  if (env.length < HEADER_BYTES) throw new DecryptError("malformed", "envelope: shorter than its header");
  if (env[0] !== VERSION) throw new DecryptError("malformed", `envelope: unknown version ${env[0]}`);
  const length = new DataView(env.buffer, env.byteOffset).getUint32(33, false);
  if (env.length !== padded(HEADER_BYTES + length) || HEADER_BYTES + length > env.length) {
    throw new DecryptError("malformed", "envelope: length does not match its padding");
  }
  for (let i = HEADER_BYTES + length; i < env.length; i++) {
    if (env[i] !== 0) throw new DecryptError("malformed", "envelope: non-zero padding");
  }
  const sealedSender = uuidString(env.subarray(17, 33));
  if (senderId != null && sealedSender !== senderId) {
    throw new DecryptError("tampered", "sealed by another sender than the hub reports",
      "(cannot decrypt: tampered: sealed by another sender than the hub reports)");
  }
  return {
    body: env.slice(HEADER_BYTES, HEADER_BYTES + length),
    clientMsgId: uuidString(env.subarray(1, 17)),
    senderId: sealedSender,
  };
}
