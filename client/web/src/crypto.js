// End-to-end encryption, version 1: exactly the envelope of docs/encryption.md, sealed and
// opened with WebCrypto's AES-256-GCM (globalThis.crypto.subtle: browsers, Node >= 20).
// Mirrors client/crypto.py: the same constants, the same checks in the same order, the
// same three failure reasons. Never puts key bytes or plaintext in an error message.

export const VERSION = 1;
export const AD_PREFIX = new TextEncoder().encode("hoomi/v1");
// Schemes (docs/encryption.md "Schemes", protocol v1.1): the scheme is bound into the AD
// ("hoomi/v<scheme>"); scheme 2's envelope has a flags byte after the version, bit 0 =
// the body is raw DEFLATE of the plaintext (what DecompressionStream("deflate-raw") reads).
export const SCHEMES = [1, 2];
export const LATEST_SCHEME = 2;
export const COMPRESS_ABOVE = 256;
export const MAX_INFLATED = 1 << 20;
export const HEADER_BYTES_V2 = 38;
const DEFLATED = 1;
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

/** AD = "hoomi/v<scheme>" | hoomi_id (16) | UTF-8(session_id). */
export function associatedData(hoomiId, sessionId, scheme = 1) {
  const prefix = new TextEncoder().encode(`hoomi/v${scheme}`);
  const sid = new TextEncoder().encode(sessionId);
  const ad = new Uint8Array(prefix.length + 16 + sid.length);
  ad.set(prefix, 0);
  ad.set(uuidBytes(hoomiId), prefix.length);
  ad.set(sid, prefix.length + 16);
  return ad;
}

async function pipeThrough(data, stream, limit = Infinity) {
  const reader = new Blob([data]).stream().pipeThrough(stream).getReader();
  const chunks = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > limit) {
      await reader.cancel();
      return null;
    }
    chunks.push(value);
  }
  const out = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

async function inflate(data) {
  let out;
  try {
    out = await pipeThrough(data, new DecompressionStream("deflate-raw"), MAX_INFLATED);
  } catch {
    throw new DecryptError("malformed", "compressed body does not inflate");
  }
  if (out === null) throw new DecryptError("malformed", `compressed body over ${MAX_INFLATED} bytes`);
  return out;
}

function padded(size) {
  return Math.ceil(size / PAD_TO) * PAD_TO;
}

/** The padded envelope (the plaintext AES-GCM encrypts); scheme 2 has a flags byte. */
export function envelope(clientMsgId, senderId, body, scheme = 1, flags = 0) {
  const head = scheme === 1 ? HEADER_BYTES : HEADER_BYTES_V2;
  const at = scheme === 1 ? 1 : 2;
  const env = new Uint8Array(padded(head + body.length));
  env[0] = scheme;
  if (scheme !== 1) env[1] = flags;
  env.set(uuidBytes(clientMsgId), at);
  env.set(uuidBytes(senderId), at + 16);
  new DataView(env.buffer).setUint32(at + 32, body.length, false);
  env.set(body, head);
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
 * scheme, clientMsgId}. opts.scheme: 1 (default) or 2 (compresses a body of
 * COMPRESS_ABOVE bytes or more when that seals smaller). `nonce` may be given only by
 * tests (the vectors); otherwise it is drawn fresh from crypto.getRandomValues.
 */
export async function encrypt(key, hoomiId, senderId, clientMsgId, body, opts = {}) {
  const scheme = opts.scheme ?? 1;
  if (!SCHEMES.includes(scheme)) throw new RangeError(`scheme: this client seals ${SCHEMES}, not ${scheme}`);
  const data = bodyBytes(body);
  let packed = data;
  let flags = 0;
  if (scheme === 2 && data.length >= COMPRESS_ABOVE) {
    const deflated = await pipeThrough(data, new CompressionStream("deflate-raw"));
    if (padded(HEADER_BYTES_V2 + deflated.length) < padded(HEADER_BYTES_V2 + data.length)) {
      packed = deflated;
      flags = DEFLATED;
    }
  }
  const limit = (opts.maxPlaintext ?? MAX_PLAINTEXT) - (scheme === 1 ? 0 : 1);
  if (packed.length > limit) {
    throw new RangeError(`body: ${packed.length} bytes, over the ${limit} bytes a message can hold`);
  }
  const nonce = opts.nonce ?? globalThis.crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
  if (nonce.length !== NONCE_BYTES) throw new RangeError("nonce: must be exactly 12 bytes");
  const sealed = await globalThis.crypto.subtle.encrypt(
    { name: "AES-GCM", iv: nonce, additionalData: associatedData(hoomiId, key.sessionId, scheme),
      tagLength: 128 },
    key.cryptoKey, envelope(clientMsgId, senderId, packed, scheme, flags));
  return { content: new Uint8Array(sealed), nonce, sessionId: key.sessionId, scheme, clientMsgId };
}

/**
 * Open a message as the hub delivered it; `senderId` is the hub's (null for a deleted
 * sender), `scheme` the message's (1 when absent). `keys` is a Keyring or a GroupKey.
 * Returns {body (Uint8Array), clientMsgId, senderId (the envelope's)} or throws
 * DecryptError; the checks run in the order of docs/encryption.md and the first that
 * fails decides the reason.
 */
export async function decrypt(keys, hoomiId, senderId, content, nonce, sessionId, scheme = 1) {
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
  if (!SCHEMES.includes(scheme)) {
    throw new DecryptError("malformed", `scheme ${scheme} is unknown to this client`,
      `(cannot decrypt: sealed with scheme ${scheme}, newer than this client)`);
  }
  let env;
  try {
    env = new Uint8Array(await globalThis.crypto.subtle.decrypt(
      { name: "AES-GCM", iv: nonce, additionalData: associatedData(hoomiId, sessionId, scheme),
        tagLength: 128 },
      key.cryptoKey, content));
  } catch {
    throw new DecryptError("tampered", "authentication failed");
  }
  const head = scheme === 1 ? HEADER_BYTES : HEADER_BYTES_V2;
  const at = scheme === 1 ? 1 : 2;
  if (env.length < head) throw new DecryptError("malformed", "envelope: shorter than its header");
  const flags = scheme === 1 ? 0 : env[1];
  if (env[0] !== scheme || (flags & ~DEFLATED) !== 0) {
    throw new DecryptError("malformed", `envelope: version ${env[0]} or flags ${flags}`);
  }
  const length = new DataView(env.buffer, env.byteOffset).getUint32(at + 32, false);
  if (env.length !== padded(head + length) || head + length > env.length) {
    throw new DecryptError("malformed", "envelope: length does not match its padding");
  }
  for (let i = head + length; i < env.length; i++) {
    if (env[i] !== 0) throw new DecryptError("malformed", "envelope: non-zero padding");
  }
  const sealedSender = uuidString(env.subarray(at + 16, at + 32));
  if (senderId != null && sealedSender !== senderId) {
    throw new DecryptError("tampered", "sealed by another sender than the hub reports",
      "(cannot decrypt: tampered: sealed by another sender than the hub reports)");
  }
  let body = env.slice(head, head + length);
  if (flags & DEFLATED) body = await inflate(body);
  return { body, clientMsgId: uuidString(env.subarray(at, at + 16)), senderId: sealedSender };
}
