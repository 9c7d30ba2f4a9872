// Type declarations of the Hoomi browser SDK (src/*.js). Wire objects keep the
// protocol's own field names (docs/protocol.md); bin fields are Uint8Array.

export type Uuid = string;

// -- crypto.js ------------------------------------------------------------------------
export const VERSION: 1;
export const AD_PREFIX: Uint8Array;
export const NONCE_BYTES: 12;
export const TAG_BYTES: 16;
export const PAD_TO: 32;
export const HEADER_BYTES: 37;
export const MAX_CONTENT: 65536;
export const MAX_PLAINTEXT: number;
export const KEY_BYTES: 32;
export const MAX_SESSION_ID_CHARS: 128;
export const SCHEMES: number[];
export const LATEST_SCHEME: 2;
export const COMPRESS_ABOVE: 256;
export const MAX_INFLATED: number;
export const HEADER_BYTES_V2: 38;
export function maxPlaintext(maxContent: number): number;

export type DecryptReason = "unknown_session" | "malformed" | "tampered" | "replayed";
export class DecryptError extends Error {
  constructor(reason: DecryptReason, detail?: string, summary?: string);
  reason: DecryptReason;
  detail: string;
  /** What a chat shows, e.g. "(cannot decrypt: wrong key or tampered)". */
  summary: string;
}

export function uuidBytes(id: Uuid): Uint8Array;
export function uuidString(bytes: Uint8Array): Uuid;
export function toHex(bytes: Uint8Array): string;
export function fromHex(hex: string): Uint8Array;
export function newUuid(): Uuid;
export function checkSessionId(sessionId: string): void;
export function associatedData(hoomiId: Uuid, sessionId: string, scheme?: number): Uint8Array;
export function envelope(clientMsgId: Uuid, senderId: Uuid, body: Uint8Array, scheme?: number, flags?: number): Uint8Array;

export class GroupKey {
  static fromBytes(sessionId: string, bytes: Uint8Array): Promise<GroupKey>;
  readonly sessionId: string;
  readonly cryptoKey: CryptoKey;
  /** SHA-256 of the key bytes (hex), to tell keys apart without holding them. */
  readonly fingerprint: string;
}

export interface Sealed {
  content: Uint8Array;
  nonce: Uint8Array;
  sessionId: string;
  scheme: number;
  clientMsgId: Uuid;
}
export interface Opened {
  body: Uint8Array;
  clientMsgId: Uuid;
  /** The sender sealed in the envelope. */
  senderId: Uuid;
}
export function encrypt(key: GroupKey, hoomiId: Uuid, senderId: Uuid, clientMsgId: Uuid,
  body: string | Uint8Array, opts?: { nonce?: Uint8Array; maxPlaintext?: number; scheme?: 1 | 2 }): Promise<Sealed>;
export function decrypt(keys: Keyring | GroupKey, hoomiId: Uuid, senderId: Uuid | null,
  content: Uint8Array, nonce: Uint8Array, sessionId: string, scheme?: number): Promise<Opened>;

// -- keys.js --------------------------------------------------------------------------
export const SCRYPT_N: 32768;
export const SCRYPT_R: 8;
export const SCRYPT_P: 1;
export const PASSPHRASE_SALT_PREFIX: Uint8Array;
export const PASSPHRASE_SESSION: "pw1";
export const KEY_FILE_VERSION: 1;
export class KeyFileError extends Error {}
export class Keyring {
  add(hoomiId: Uuid, key: GroupKey): void;
  get(hoomiId: Uuid, sessionId: string): GroupKey | null;
  current(hoomiId: Uuid): GroupKey | null;
  hoomis(): Uuid[];
  keysOf(hoomiId: Uuid): GroupKey[];
}
export function keyFromPassphrase(passphrase: string, hoomiId: Uuid, sessionId?: string): Promise<GroupKey>;
export function passphraseBytes(passphrase: string, hoomiId: Uuid): Promise<Uint8Array>;
export function parseKeyFile(text: string, name?: string): Promise<Keyring>;

// -- outbox.js ------------------------------------------------------------------------
export interface OutboxEntry {
  clientMsgId: Uuid;
  hoomiId: Uuid;
  content: Uint8Array;
  nonce: Uint8Array;
  sessionId: string;
  scheme?: number;
  createdAt: number;
  order: number;
}
export interface Outbox {
  put(entry: OutboxEntry): Promise<void>;
  remove(clientMsgId: Uuid): Promise<void>;
  all(): Promise<OutboxEntry[]>;
  close(): void;
}
export class MemoryOutbox implements Outbox {
  put(entry: OutboxEntry): Promise<void>;
  remove(clientMsgId: Uuid): Promise<void>;
  all(): Promise<OutboxEntry[]>;
  close(): void;
}
export class IndexedDbOutbox implements Outbox {
  static open(name: string, indexedDB?: IDBFactory): Promise<IndexedDbOutbox>;
  put(entry: OutboxEntry): Promise<void>;
  remove(clientMsgId: Uuid): Promise<void>;
  all(): Promise<OutboxEntry[]>;
  close(): void;
}

// -- client.js ------------------------------------------------------------------------
export interface HoomiInfo { hoomi_id: Uuid; last_seq: number; role: "admin" | "member"; read_seq?: number }
export interface Welcome { type: "welcome"; user_id: Uuid; hoomis: HoomiInfo[]; max_content_bytes?: number; features?: string[]; ref?: string }
export interface MessageBody {
  id: Uuid; hoomi_id: Uuid; seq: number; sender_id: Uuid | null; created_at: number;
  content?: Uint8Array; nonce?: Uint8Array; session_id?: string; deleted?: boolean;
  scheme?: number; updated_at?: number;
}
export interface Edited { type: "edited"; hoomi_id: Uuid; id: Uuid; seq: number; content: Uint8Array; nonce: Uint8Array; session_id: string; scheme: number; updated_at: number }
export interface Receipt { type: "receipt"; hoomi_id: Uuid; user_id: Uuid; seq: number }
export interface Typing { type: "typing"; hoomi_id: Uuid; user_id: Uuid }
export interface MessagePush extends MessageBody { type: "message" }
export interface Deleted { type: "deleted"; hoomi_id: Uuid; id: Uuid; seq: number }
export interface Membership { type: "membership"; hoomi_id: Uuid; state: "joined" | "left" }
export interface Ack { type: "ack"; ref: number; id: Uuid; hoomi_id: Uuid; seq: number; created_at: number; client_msg_id?: Uuid }
export interface Page { type: "page"; ref: number; hoomi_id: Uuid; messages: MessageBody[]; next_before?: number | null; has_more?: boolean }
export interface StateChange { state: "idle" | "connecting" | "live" | "waiting" | "stopped"; url?: string; code?: number; delayMs?: number; attempt?: number; error?: Error }

export type ClosePolicy = "resume" | "token" | "backoff" | "never";
export const CLOSE_POLICY: Record<number, ClosePolicy>;
export const RETRYABLE: Set<string>;
export const REPLAY_WINDOW: number;
export class HubError extends Error { code: string; retryAfterMs?: number }
export class Closed extends Error {}
export function backoffDelay(attempt: number, opts?: { baseMs?: number; capMs?: number; random?: () => number }): number;

export interface ClientOptions {
  keyring?: Keyring;
  outbox?: Outbox;
  WebSocket?: typeof WebSocket;
  baseMs?: number;
  capMs?: number;
  pingMs?: number;
  pongTimeoutMs?: number;
  helloTimeoutMs?: number;
  random?: () => number;
  /** Ask for receipt and typing pushes (hello.features ["signals"], protocol v1.1). */
  signals?: boolean;
  /** The scheme new messages are sealed with: 1 (default, v1) or 2. */
  scheme?: 1 | 2;
  /** Ask for "batch" (hello.features, SPEC 7.2): the hub may pack several frames into one
   * WebSocket message, a msgpack stream, handled frame by frame in order. Default true. */
  batch?: boolean;
}

export interface Events {
  message: MessagePush;
  deleted: Deleted;
  membership: Membership;
  edited: Edited;
  receipt: Receipt;
  typing: Typing;
  /** Any push this SDK has no name for. */
  push: { type: string; [field: string]: unknown };
  welcome: Welcome;
  state: StateChange;
  error: HubError;
  stopped: Error;
  send_failed: { entry: OutboxEntry; error: Error };
}

export class HoomiClient {
  constructor(urls: string | string[], token: string | (() => string | Promise<string>), options?: ClientOptions);
  readonly urls: string[];
  keyring: Keyring | null;
  readonly outbox: Outbox;
  readonly userId: Uuid | null;
  readonly hoomis: Map<Uuid, HoomiInfo>;
  readonly maxContentBytes: number;
  readonly state: StateChange["state"];
  readonly lastSeq: Map<Uuid, number>;
  readonly reconnects: number;
  /** What the hub accepted of hello.features ("signals", "batch"). */
  readonly features: string[];
  readonly signals: boolean;
  readonly batch: boolean;
  on<K extends keyof Events>(type: K, fn: (value: Events[K]) => void): () => void;
  start(): Promise<Welcome>;
  close(): void;
  request(type: string, fields?: Record<string, unknown>): Promise<{ type: string; [field: string]: unknown }>;
  notify(type: string, fields?: Record<string, unknown>): boolean;
  send(hoomiId: Uuid, body: string | Uint8Array, opts?: { clientMsgId?: Uuid }): Promise<Ack>;
  pendingSends(): Promise<OutboxEntry[]>;
  history(hoomiId: Uuid, opts?: { before?: number; limit?: number }): Promise<Page>;
  scroll(hoomiId: Uuid, opts?: { limit?: number; before?: number }): AsyncGenerator<MessageBody[]>;
  sync(hoomiId: Uuid, after: number, opts?: { limit?: number }): Promise<Page>;
  delete(hoomiId: Uuid, messageId: Uuid): Promise<Ack>;
  ping(): Promise<{ type: "pong"; ref: number }>;
  read(hoomiId: Uuid, seq: number): Promise<number>;
  typing(hoomiId: Uuid): boolean;
  presence(hoomiId: Uuid): Promise<Uuid[]>;
  open(message: MessageBody): Promise<Opened & { text: string | null }>;
}
