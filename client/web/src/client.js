// The browser client of protocol v1 (docs/protocol.md): one WebSocket, msgpack maps in
// binary frames, hello with resume, jittered reconnect across URLs, exactly-once sends
// through an outbox (IndexedDB in a browser), history pages, delete for everyone.
//
//   const client = new HoomiClient(["wss://hub.example/v1/ws"], token, { keyring, outbox });
//   client.on("message", (m) => ...);   // pushes, each once, in seq order per Hoomi
//   await client.start();               // resolves with the first welcome
//   await client.send(hoomiId, "hi");   // sealed here, resolves with the hub's ack
//
// Guarantees, as the Python SDK (client/sdk.py):
// - send() is sealed once and written to the outbox before it is sent; it is resent with
//   the same client_msg_id and bytes after a reconnect, on `unavailable`/`rate_limited`,
//   and after a reload (entries left in the outbox are resent by start()), until acked.
// - every request waiting for a reply is sent again on the next socket, so history,
//   delete and ping survive a reconnect too (each is idempotent).
// - message pushes are delivered once: the client resumes every Hoomi from the last seq
//   it delivered, and drops a push at or below it.
// - reconnects use full-jitter exponential backoff, moving to the next URL after each
//   failure; a close code's own policy decides whether to go on (see CLOSE_POLICY).
//
// Protocol v1.1 (docs/protocol.md): with `signals: true` the hello asks for "signals" and
// read()/typing()/presence() and the "receipt"/"typing" events work; "edited" pushes are
// an event; messages of scheme 2 open (scheme: 2 seals with it). Frames this SDK has no
// name for go through request()/notify() and arrive as the "push" event.
//
// "batch" (SPEC 7.2): the hello asks for it unless `batch: false`; the hub may then pack
// several frames into one WebSocket message (a msgpack stream of maps), which is handled
// frame by frame, in order, exactly as one frame per message.

import { decodeMulti, encode } from "@msgpack/msgpack";

import { DecryptError, MAX_CONTENT, decrypt, encrypt, maxPlaintext, newUuid } from "./crypto.js";
import { MemoryOutbox } from "./outbox.js";

export const RETRYABLE = new Set(["unavailable", "rate_limited"]);
export const REPLAY_WINDOW = 10000;

/** What each close code means for the client: "resume" (reconnect, resume), "token" (a
 * new token, then resume), "backoff" (wait, then resume), "never" (a client bug: stop). */
export const CLOSE_POLICY = {
  4400: "never", 1008: "never", 1009: "never",
  4401: "token", 1013: "backoff", 4408: "resume", 1012: "resume",
};

export class HubError extends Error {
  constructor(code, message, retryAfterMs) {
    super(`${code}: ${message}`);
    this.name = "HubError";
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

export class Closed extends Error {
  constructor(message) {
    super(message);
    this.name = "Closed";
  }
}

/** Full jitter: a random delay in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt, { baseMs = 250, capMs = 10000, random = Math.random } = {}) {
  return random() * Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
}

const ENCODE_OPTIONS = { ignoreUndefined: true };

export class HoomiClient {
  /**
   * urls: one or more replica URLs (ws:// or wss://, path /v1/ws).
   * token: a JWT, or a function (sync or async) returning one: then an expired socket
   *   (close 4401 after a welcome) fetches a fresh token and resumes.
   * options: keyring (for send/open), outbox (MemoryOutbox by default), WebSocket (the
   *   constructor; globalThis.WebSocket by default), baseMs/capMs (backoff), pingMs,
   *   pongTimeoutMs, helloTimeoutMs, random, signals, scheme, batch (default true: ask
   *   for "batch", several frames per WebSocket message).
   */
  constructor(urls, token, options = {}) {
    this.urls = Array.isArray(urls) ? [...urls] : [urls];
    if (this.urls.length === 0) throw new RangeError("urls: at least one hub URL");
    this.token = token;
    this.keyring = options.keyring ?? null;
    this.outbox = options.outbox ?? new MemoryOutbox();
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.backoff = { baseMs: options.baseMs ?? 250, capMs: options.capMs ?? 10000,
      random: options.random ?? Math.random };
    this.pingMs = options.pingMs ?? 20000;
    this.pongTimeoutMs = options.pongTimeoutMs ?? 10000;
    this.helloTimeoutMs = options.helloTimeoutMs ?? 15000;
    this.signals = options.signals ?? false;
    this.batch = options.batch ?? true;
    this.scheme = options.scheme ?? 1;
    this.features = []; // what the hub accepted of hello.features
    this._typingAt = new Map(); // hoomi_id -> ms of the last typing frame sent
    this.userId = null;
    this.hoomis = new Map(); // hoomi_id -> {hoomi_id, last_seq, role} from welcome
    this.maxContentBytes = MAX_CONTENT;
    this.state = "idle"; // idle | connecting | live | waiting | stopped
    this.lastSeq = new Map(); // hoomi_id -> last seq delivered: the resume map
    this.reconnects = 0;
    this._listeners = new Map();
    this._pending = new Map(); // ref -> {frame, resolve, reject, outbox}
    this._nextRef = 1;
    this._ws = null;
    this._live = false;
    this._attempt = 0;
    this._urlIndex = 0;
    this._timers = new Set();
    this._opened = new Map(); // replay window: "hoomi|sender|cmid" -> seq
    this._order = 0;
    this._started = null;
    this._stopError = null;
  }

  // -- events -------------------------------------------------------------------------

  /** Listen to "message", "deleted", "membership", "push" (any other push), "welcome",
   * "state", "error" (an error frame without a request), "stopped". Returns an unsubscribe. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type)?.delete(fn);
  }

  _emit(type, value) {
    for (const fn of this._listeners.get(type) ?? []) {
      try {
        fn(value);
      } catch (err) {
        console.error(`hoomi: a "${type}" listener threw`, err);
      }
    }
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  // -- life cycle ---------------------------------------------------------------------

  /** Connect; resolves with the first welcome. Entries left in the outbox (a previous
   * page's unacked sends) are queued first, in the order they were made. */
  start() {
    if (this._started) return this._started;
    this._started = new Promise((resolve, reject) => {
      this._firstWelcome = { resolve, reject };
    });
    this._started.catch(() => {});
    (async () => {
      for (const entry of await this.outbox.all()) {
        this._order = Math.max(this._order, entry.order + 1);
        this._queueSend(entry);
      }
      this._connect();
    })().catch((err) => this._stop(err));
    return this._started;
  }

  /** Stop for good: pending requests reject with Closed; the outbox keeps unacked sends. */
  close() {
    this._stop(new Closed("client closed"));
  }

  _stop(err) {
    if (this.state === "stopped") return;
    this._stopError = err;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    const ws = this._ws;
    this._ws = null;
    this._live = false;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    for (const p of this._pending.values()) p.reject(err);
    this._pending.clear();
    this._firstWelcome?.reject(err);
    this._setState("stopped", { error: err });
    this._emit("stopped", err);
  }

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _cancel(t) {
    if (t != null) {
      clearTimeout(t);
      this._timers.delete(t);
    }
  }

  async _token() {
    return typeof this.token === "function" ? await this.token() : this.token;
  }

  _connect() {
    if (this.state === "stopped") return;
    const url = this.urls[this._urlIndex % this.urls.length];
    this._setState("connecting", { url, attempt: this._attempt });
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (err) {
      this._dropped(null, { code: 1006, reason: String(err) });
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._live = false;
    let helloTimer = null;
    let pingTimer = null;
    let pongTimer = null;
    let welcomed = false;
    const cleanup = () => {
      this._cancel(helloTimer);
      this._cancel(pingTimer);
      this._cancel(pongTimer);
    };
    ws.onopen = async () => {
      let token;
      try {
        token = await this._token();
      } catch (err) {
        this._stop(err);
        return;
      }
      if (this._ws !== ws) return;
      const resume = {};
      for (const [h, seq] of this.lastSeq) resume[h] = seq;
      const hello = { type: "hello", token, resume, ref: "hello" };
      const features = [];
      if (this.signals) features.push("signals");
      if (this.batch) features.push("batch");
      if (features.length) hello.features = features;
      this._write(ws, hello);
      helloTimer = this._later(this.helloTimeoutMs, () => ws.close(4000, "no welcome"));
    };
    ws.onmessage = (event) => {
      // One frame, or under "batch" several: a msgpack stream, decoded whole first.
      let frames;
      try {
        frames = [...decodeMulti(new Uint8Array(event.data))];
      } catch {
        return; // not msgpack (or a cut stream): not the hub we speak to; ignore it
      }
      for (const frame of frames) {
        if (this._ws !== ws) return; // a listener closed the client, or the socket dropped
        onFrame(frame);
      }
    };
    const onFrame = (frame) => {
      if (frame === null || typeof frame !== "object" || typeof frame.type !== "string") return;
      if (frame.type === "welcome") {
        welcomed = true;
        this._cancel(helloTimer);
        this._welcome(ws, frame);
        const ping = () => {
          pingTimer = this._later(this.pingMs, () => {
            const ref = `ping-${this._nextRef++}`;
            this._write(ws, { type: "ping", ref });
            pongTimer = this._later(this.pongTimeoutMs, () => ws.close(4000, "no pong"));
            this._pongWaiter = { ref, done: () => { this._cancel(pongTimer); ping(); } };
          });
        };
        ping();
        return;
      }
      if (frame.type === "pong" && this._pongWaiter && frame.ref === this._pongWaiter.ref) {
        const w = this._pongWaiter;
        this._pongWaiter = null;
        w.done();
        return;
      }
      if (!welcomed && frame.type === "error" && frame.code === "unauthorized") {
        this._unauthorizedBeforeWelcome = true;
      }
      this._dispatch(ws, frame);
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = (event) => {
      cleanup();
      this._dropped(ws, event, welcomed);
    };
  }

  _dropped(ws, event, welcomed = false) {
    if (ws !== null && this._ws !== ws) return;
    this._ws = null;
    this._live = false;
    this._pongWaiter = null;
    if (this.state === "stopped") return;
    const policy = CLOSE_POLICY[event.code] ?? "resume";
    if (policy === "never") {
      this._stop(new Closed(`the hub closed the socket with ${event.code}: ${event.reason || "a client bug"}`));
      return;
    }
    if (policy === "token" && (!welcomed || typeof this.token !== "function")) {
      this._stop(new HubError("unauthorized", `the hub refused the token (close ${event.code})`));
      return;
    }
    this._unauthorizedBeforeWelcome = false;
    this._urlIndex = (this._urlIndex + 1) % this.urls.length;
    const delay = backoffDelay(this._attempt, this.backoff);
    this._attempt += 1;
    this.reconnects += 1;
    this._setState("waiting", { code: event.code, delayMs: delay });
    this._later(delay, () => this._connect());
  }

  _welcome(ws, frame) {
    this.userId = frame.user_id;
    this.maxContentBytes = frame.max_content_bytes ?? MAX_CONTENT;
    this.features = Array.isArray(frame.features) ? frame.features : [];
    this.hoomis = new Map(frame.hoomis.map((h) => [h.hoomi_id, h]));
    for (const h of frame.hoomis) {
      // Not in resume: the hub starts at its last_seq, so that is where pushes start.
      if (!this.lastSeq.has(h.hoomi_id)) this.lastSeq.set(h.hoomi_id, h.last_seq);
    }
    for (const h of [...this.lastSeq.keys()]) {
      if (!this.hoomis.has(h)) this.lastSeq.delete(h);
    }
    this._attempt = 0;
    this._live = true;
    this._setState("live", { url: ws.url });
    this._emit("welcome", frame);
    this._firstWelcome?.resolve(frame);
    this._firstWelcome = null;
    // Everything still waiting for a reply goes out again on this socket, in ref order:
    // sends in the order they were made, so their seqs keep that order.
    for (const [ref, p] of [...this._pending].sort((a, b) => a[0] - b[0])) {
      if (!p.retryTimer) this._write(ws, { ...p.frame, ref });
    }
  }

  _dispatch(ws, frame) {
    switch (frame.type) {
      case "message": {
        const last = this.lastSeq.get(frame.hoomi_id) ?? 0;
        if (frame.seq <= last) return; // already delivered (a resend after resume)
        this.lastSeq.set(frame.hoomi_id, frame.seq);
        this._emit("message", frame);
        return;
      }
      case "deleted":
        this._emit("deleted", frame);
        return;
      case "membership":
        if (frame.state === "left") {
          this.lastSeq.delete(frame.hoomi_id);
          this.hoomis.delete(frame.hoomi_id);
        } else if (!this.hoomis.has(frame.hoomi_id)) {
          this.hoomis.set(frame.hoomi_id, { hoomi_id: frame.hoomi_id, last_seq: 0, role: "member" });
        }
        this._emit("membership", frame);
        return;
      case "edited":
      case "receipt":
      case "typing":
        this._emit(frame.type, frame);
        return;
      case "ack":
      case "page":
      case "pong":
      case "presence":
        this._reply(frame);
        return;
      case "error":
        if (frame.ref !== undefined && this._pending.has(frame.ref)) {
          this._failed(ws, frame);
        } else {
          this._emit("error", new HubError(frame.code, frame.message ?? "", frame.retry_after_ms));
        }
        return;
      default:
        if (frame.ref !== undefined && this._pending.has(frame.ref)) this._reply(frame);
        else this._emit("push", frame);
    }
  }

  _reply(frame) {
    const p = this._pending.get(frame.ref);
    if (!p) return; // a reply to a request resent after a reconnect: already answered
    this._pending.delete(frame.ref);
    if (p.outbox) {
      this.outbox.remove(p.outbox).catch((err) => console.error("hoomi: outbox remove failed", err));
    }
    p.resolve(frame);
  }

  _failed(ws, frame) {
    const p = this._pending.get(frame.ref);
    if (RETRYABLE.has(frame.code)) {
      // Same frame, same client_msg_id, after the hub's delay (or on the next socket).
      const wait = frame.retry_after_ms ?? 1000;
      p.retryTimer = this._later(wait, () => {
        p.retryTimer = null;
        if (this._live && this._ws) this._write(this._ws, { ...p.frame, ref: frame.ref });
      });
      return;
    }
    this._pending.delete(frame.ref);
    if (p.outbox) this.outbox.remove(p.outbox).catch(() => {});
    p.reject(new HubError(frame.code, frame.message ?? "", frame.retry_after_ms));
  }

  _write(ws, frame) {
    try {
      ws.send(encode(frame, ENCODE_OPTIONS));
    } catch {
      // the socket is closing: its close event reconnects and resends
    }
  }

  // -- requests -----------------------------------------------------------------------

  /** Send any request frame and resolve with its reply (ack, page, pong, or a new type's
   * reply such as presence). Resent on the next socket until answered. */
  request(type, fields = {}) {
    if (this.state === "stopped") return Promise.reject(this._stopError);
    return this._enqueue({ type, ...fields });
  }

  /** Send a frame that gets no reply (SPEC 7.2's typing, say) if live; dropped otherwise. */
  notify(type, fields = {}) {
    if (this._live && this._ws) this._write(this._ws, { type, ...fields });
    return this._live;
  }

  _enqueue(frame, outboxId = null) {
    const ref = this._nextRef++;
    return new Promise((resolve, reject) => {
      this._pending.set(ref, { frame, resolve, reject, outbox: outboxId, retryTimer: null });
      if (this._live && this._ws) this._write(this._ws, { ...frame, ref });
    });
  }

  _queueSend(entry) {
    const frame = { type: "send", hoomi_id: entry.hoomiId, client_msg_id: entry.clientMsgId,
      content: entry.content, nonce: entry.nonce, session_id: entry.sessionId };
    if ((entry.scheme ?? 1) !== 1) frame.scheme = entry.scheme; // a v1 send carries none
    const promise = this._enqueue(frame, entry.clientMsgId);
    promise.catch((err) => this._emit("send_failed", { entry, error: err }));
    return promise;
  }

  /** Seal `body` (string or bytes) with the Hoomi's current key and send it; resolves with
   * the ack {id, hoomi_id, seq, created_at, client_msg_id}. */
  async send(hoomiId, body, { clientMsgId = newUuid() } = {}) {
    if (this.state === "stopped") throw this._stopError;
    const key = this.keyring?.current(hoomiId);
    if (!key) throw new DecryptError("unknown_session", "no key for this Hoomi: add one before sending");
    if (!this.userId) await this.start();
    const sealed = await encrypt(key, hoomiId, this.userId, clientMsgId, body,
      { maxPlaintext: maxPlaintext(this.maxContentBytes), scheme: this.scheme });
    const entry = { clientMsgId, hoomiId, content: sealed.content, nonce: sealed.nonce,
      sessionId: sealed.sessionId, scheme: sealed.scheme, createdAt: Date.now(),
      order: this._order++ };
    await this.outbox.put(entry); // on disk before it is on the wire
    const ack = await this._queueSend(entry);
    return { ...ack, client_msg_id: clientMsgId };
  }

  /** Sends written to the outbox and not acked yet (this page's and a previous one's). */
  pendingSends() {
    return this.outbox.all();
  }

  /** One page of history, newest first: {hoomi_id, messages, next_before}. */
  history(hoomiId, { before, limit = 50 } = {}) {
    return this.request("history", { hoomi_id: hoomiId, before, limit });
  }

  /** Every page of a Hoomi's history, from the newest back to the oldest. */
  async *scroll(hoomiId, { limit = 50, before } = {}) {
    let cursor = before;
    for (;;) {
      const page = await this.history(hoomiId, { before: cursor, limit });
      if (page.messages.length) yield page.messages;
      if (page.next_before == null) return;
      cursor = page.next_before;
    }
  }

  /** Up to `limit` messages with seq > after, ascending: {messages, has_more}. */
  sync(hoomiId, after, { limit = 100 } = {}) {
    return this.request("sync", { hoomi_id: hoomiId, after, limit });
  }

  /** Delete for everyone (the sender or a Hoomi admin). */
  delete(hoomiId, messageId) {
    return this.request("delete", { hoomi_id: hoomiId, id: messageId });
  }

  ping() {
    return this.request("ping");
  }

  // -- live signals (v1.1) --------------------------------------------------------------

  /** This user has read `hoomiId` up to `seq`; resolves with the stored position (never
   * lower than before). The other members' signal sockets get a "receipt". */
  async read(hoomiId, seq) {
    const ack = await this.request("read", { hoomi_id: hoomiId, seq });
    const info = this.hoomis.get(hoomiId);
    if (info) info.read_seq = Math.max(info.read_seq ?? 0, ack.seq);
    return ack.seq;
  }

  /** Say this user is typing in `hoomiId`: sent at most once a second per Hoomi (the hub
   * hands on no more), so call it on every keystroke. Returns whether a frame went out. */
  typing(hoomiId) {
    const now = Date.now();
    if (now - (this._typingAt.get(hoomiId) ?? 0) < 1000) return false;
    if (!this.notify("typing", { hoomi_id: hoomiId })) return false;
    this._typingAt.set(hoomiId, now);
    return true;
  }

  /** The Hoomi's members with a live socket on any replica (the asker included). */
  async presence(hoomiId) {
    return (await this.request("presence", { hoomi_id: hoomiId })).user_ids;
  }

  // -- opening ------------------------------------------------------------------------

  /** Open a message (push or page entry): {body, text, clientMsgId, senderId} or a
   * DecryptError (reasons of docs/encryption.md, plus "replayed" for a second copy). */
  async open(message) {
    if (message.deleted) throw new DecryptError("malformed", "deleted for everyone");
    if (!this.keyring) throw new DecryptError("unknown_session", "no keys loaded");
    const opened = await decrypt(this.keyring, message.hoomi_id, message.sender_id ?? null,
      message.content, message.nonce, message.session_id, message.scheme ?? 1);
    const id = `${message.hoomi_id}|${opened.senderId}|${opened.clientMsgId}`;
    const seen = this._opened.get(id);
    if (seen !== undefined && seen < message.seq) {
      throw new DecryptError("replayed", `a copy of seq ${seen}`);
    }
    this._opened.delete(id);
    this._opened.set(id, Math.min(seen ?? message.seq, message.seq));
    if (this._opened.size > REPLAY_WINDOW) this._opened.delete(this._opened.keys().next().value);
    let text = null;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(opened.body);
    } catch {
      // not UTF-8: bytes only
    }
    return { ...opened, text };
  }
}
