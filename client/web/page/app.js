// The web chat page the hub serves at /chat/ (bundled by build.mjs into dist/app.js).
// Everything secret stays in this tab's memory: the token (pasted by the user) and the
// keys (a passphrase derived here with scrypt, or a key file read here). The outbox of
// sealed, unacked sends is kept in IndexedDB so a reload resends them exactly once.

import {
  DecryptError, HoomiClient, IndexedDbOutbox, KeyFileError, Keyring, MemoryOutbox,
  keyFromPassphrase, parseKeyFile,
} from "../src/index.js";

const PAGE = 50;
const $ = (id) => document.getElementById(id);

const ui = {
  status: $("status"), connect: $("connect"), token: $("token"), urls: $("urls"),
  connectError: $("connect-error"), chat: $("chat"), hoomis: $("hoomis"),
  keyfile: $("keyfile"), room: $("room"), roomTitle: $("room-title"), keyForm: $("key-form"),
  keyMissing: $("key-missing"), passphrase: $("passphrase"), session: $("session"),
  scroller: $("scroller"), top: $("top"), list: $("messages"), composer: $("composer"),
  text: $("text"), send: $("send"), roomError: $("room-error"), presence: $("presence"),
  receipts: $("receipts"), typing: $("typing"),
};
const TYPING_SHOWN_MS = 4000;
const PRESENCE_EVERY_MS = 15000;
const receipts = new Map(); // hoomi_id -> Map(user_id -> greatest seq read)
const typers = new Map(); // user_id -> ms of their last typing push (current Hoomi)

const keyring = new Keyring();
let client = null;
let current = null; // the Hoomi shown: {id, bySeq: Map(seq -> li), nextBefore, loading, done, generation}
const unread = new Map();
let generation = 0;

// For tests and the bench: counters, never message text.
window.hoomiPage = { rendered: 0, opened: 0, failed: 0, lastOpenedAt: 0, get client() { return client; },
  get current() { return current && { id: current.id, count: current.bySeq.size, done: current.done }; } };

const wsDefault = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
ui.urls.value = wsDefault;

function status(text) {
  ui.status.textContent = text;
}

function short(id) {
  return id ? id.slice(0, 8) : "deleted user";
}

function tokenSubject(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).sub ?? null;
  } catch {
    return null;
  }
}

ui.connect.addEventListener("submit", async (event) => {
  event.preventDefault();
  ui.connectError.textContent = "";
  const token = ui.token.value.trim();
  const urls = ui.urls.value.split(/\s+/).filter(Boolean);
  const sub = tokenSubject(token);
  if (!sub) {
    ui.connectError.textContent = "Token: not a Hoomi token (expected a JWT from `hoomi token`).";
    ui.token.focus();
    return;
  }
  if (!urls.length || urls.some((u) => !/^wss?:\/\//.test(u))) {
    ui.connectError.textContent = "Hub URLs: each must start with ws:// or wss://.";
    ui.urls.focus();
    return;
  }
  let outbox;
  try {
    outbox = await IndexedDbOutbox.open(`hoomi-outbox:${sub}`);
  } catch {
    outbox = new MemoryOutbox(); // private mode without IndexedDB: unacked sends die with the tab
  }
  client?.close();
  client = new HoomiClient(urls, token, { keyring, outbox, signals: true });
  client.on("state", onState);
  client.on("welcome", onWelcome);
  client.on("message", onMessage);
  client.on("deleted", onDeleted);
  client.on("membership", () => renderHoomis());
  client.on("edited", onEdited);
  client.on("receipt", onReceipt);
  client.on("typing", onTyping);
  client.on("send_failed", ({ entry, error }) => {
    removePending(entry.clientMsgId);
    ui.roomError.textContent = `A message could not be sent: ${error.message}`;
  });
  client.on("stopped", (err) => {
    if (err?.name === "HubError" && err.code === "unauthorized") {
      ui.chat.hidden = true;
      ui.connect.hidden = false;
      ui.connectError.textContent = "The hub refused this token (expired or wrong). Paste a fresh one.";
      ui.token.focus();
    }
  });
  status("Connecting…");
  try {
    await client.start();
  } catch (err) {
    ui.connectError.textContent = `Could not connect: ${err.message}`;
    return;
  }
  ui.token.value = ""; // the client holds it; nothing else does
  ui.connect.hidden = true;
  ui.chat.hidden = false;
  renderHoomis();
  ui.hoomis.querySelector("button")?.focus();
  for (const entry of await client.pendingSends()) addPending(entry.hoomiId, entry.clientMsgId, null);
});

function onState({ state, url, code, delayMs }) {
  if (state === "live") status(`Connected to ${url}${client?.userId ? ` as ${short(client.userId)}` : ""}.`);
  else if (state === "connecting") status(`Connecting to ${url}…`);
  else if (state === "waiting") status(`Connection lost (${code}); reconnecting in ${(delayMs / 1000).toFixed(1)} s…`);
  else if (state === "stopped") status("Disconnected.");
}

function onWelcome() {
  renderHoomis();
  if (current) refreshPresence();
  // After a reconnect the hub resumed every Hoomi: pushes fill what was missed.
}

function renderHoomis() {
  if (!client) return;
  ui.hoomis.replaceChildren();
  for (const [id, info] of client.hoomis) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.hoomi = id;
    b.textContent = `Hoomi ${short(id)}`;
    b.title = id;
    if (info.role === "admin") b.textContent += " (admin)";
    const n = unread.get(id) ?? 0;
    if (n) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = String(n);
      badge.setAttribute("aria-label", `${n} new`);
      b.append(badge);
    }
    if (current?.id === id) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => selectHoomi(id));
    li.append(b);
    ui.hoomis.append(li);
  }
  if (current && !client.hoomis.has(current.id)) {
    ui.room.hidden = true;
    current = null;
  }
}

async function selectHoomi(id) {
  generation += 1;
  current = { id, bySeq: new Map(), nextBefore: undefined, loading: false, done: false, generation,
    newest: 0, readSent: client.hoomis.get(id)?.read_seq ?? 0 };
  typers.clear();
  renderTyping();
  renderReceipts();
  refreshPresence();
  unread.delete(id);
  renderHoomis();
  ui.room.hidden = false;
  ui.roomTitle.textContent = `Hoomi ${short(id)}`;
  ui.roomTitle.title = id;
  ui.list.replaceChildren();
  ui.roomError.textContent = "";
  ui.top.textContent = "";
  updateKeyState();
  await loadOlder();
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  (keyring.current(id) ? ui.text : ui.passphrase).focus();
  await fillViewport();
  maybeRead();
}

function updateKeyState() {
  if (!current) return;
  const key = keyring.current(current.id);
  ui.keyForm.hidden = Boolean(key);
  ui.keyMissing.textContent = key ? "" : "No key for this Hoomi in this tab: enter its passphrase or "
    + "load a key file. Until then its messages cannot be opened and you cannot send.";
  ui.text.disabled = !key;
  ui.send.disabled = !key;
}

ui.keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!current) return;
  const passphrase = ui.passphrase.value;
  if (!passphrase) {
    ui.keyMissing.textContent = "Passphrase: must not be empty.";
    ui.passphrase.focus();
    return;
  }
  status("Deriving the key (scrypt)…");
  try {
    keyring.add(current.id, await keyFromPassphrase(passphrase, current.id, ui.session.value.trim() || "pw1"));
  } catch (err) {
    ui.keyMissing.textContent = `Key: ${err.message}`;
    return;
  } finally {
    ui.passphrase.value = "";
    if (client) onState({ state: client.state, url: client.urls[0] });
  }
  updateKeyState();
  await reopenAll();
  ui.text.focus();
});

ui.keyfile.addEventListener("change", async () => {
  const file = ui.keyfile.files?.[0];
  if (!file) return;
  try {
    const ring = await parseKeyFile(await file.text(), file.name);
    for (const h of ring.hoomis()) for (const k of ring.keysOf(h)) keyring.add(h, k);
    status(`Loaded keys for ${ring.hoomis().length} Hoomi(s) from ${file.name}.`);
  } catch (err) {
    ui.roomError.textContent = err instanceof KeyFileError ? err.message : `Key file: ${err.message}`;
  } finally {
    ui.keyfile.value = "";
  }
  updateKeyState();
  await reopenAll();
});

async function reopenAll() {
  if (!current) return;
  for (const li of current.bySeq.values()) if (li._message && !li._message.deleted) await fillBody(li, li._message);
}

// -- messages -------------------------------------------------------------------------

function makeItem(m) {
  if (current && m.hoomi_id === current.id) current.newest = Math.max(current.newest, m.seq);
  const li = document.createElement("li");
  li.dataset.seq = String(m.seq);
  li.dataset.id = m.id;
  li._message = m;
  const meta = document.createElement("div");
  meta.className = "meta";
  const who = document.createElement("span");
  const mine = client && m.sender_id === client.userId;
  who.textContent = mine ? "you" : short(m.sender_id);
  const when = document.createElement("time");
  const at = new Date(m.created_at);
  when.dateTime = at.toISOString();
  when.textContent = at.toLocaleTimeString();
  meta.append(who, when);
  if (!m.deleted && m.updated_at && m.updated_at !== m.created_at) {
    const mark = document.createElement("span");
    mark.className = "edited";
    mark.textContent = "edited";
    meta.append(mark);
  }
  const role = client?.hoomis.get(m.hoomi_id)?.role;
  if (!m.deleted && (mine || role === "admin")) {
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "Delete for everyone";
    del.setAttribute("aria-label", `Delete message ${m.seq} for everyone`);
    del.addEventListener("click", () => deleteMessage(m));
    meta.append(del);
  }
  if (mine) li.classList.add("mine");
  const body = document.createElement("div");
  body.className = "body";
  li.append(meta, body);
  window.hoomiPage.rendered += 1;
  return li;
}

async function fillBody(li, m) {
  const body = li.querySelector(".body");
  li.classList.remove("undecryptable", "tombstone");
  if (m.deleted) {
    li.classList.add("tombstone");
    body.textContent = "(deleted for everyone)";
    li.querySelector("button.delete")?.remove();
    return;
  }
  try {
    const opened = await client.open(m);
    body.textContent = opened.text ?? `(${opened.body.length} bytes that are not text)`;
    window.hoomiPage.opened += 1;
    window.hoomiPage.lastOpenedAt = performance.now();
    removePending(opened.clientMsgId);
  } catch (err) {
    li.classList.add("undecryptable");
    body.textContent = err instanceof DecryptError ? err.summary : `(cannot decrypt: ${err.message})`;
    window.hoomiPage.failed += 1;
  }
}

/** Put a message in its place by seq (history pages come newest first, pushes in order). */
function place(li, seq) {
  const items = ui.list.children;
  let lo = 0;
  let hi = items.length;
  if (hi && Number(items[hi - 1].dataset.seq ?? Infinity) < seq) lo = hi; // the usual: newest
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    const s = Number(items[mid].dataset.seq ?? Infinity);
    if (s < seq) lo = mid + 1;
    else hi = mid;
  }
  ui.list.insertBefore(li, items[lo] ?? null);
}

// Live pushes are put in the page in batches: one layout read (is the reader at the
// bottom?) and one scroll per batch, not per message, so a burst into a long list stays
// cheap. A batch is whatever arrived while the previous one was being opened.
let liveQueue = [];
let flushing = null;

function onMessage(m) {
  if (!current || m.hoomi_id !== current.id) {
    unread.set(m.hoomi_id, (unread.get(m.hoomi_id) ?? 0) + 1);
    scheduleHoomis();
    return;
  }
  liveQueue.push(m);
  flushing ??= flushLive();
}

async function flushLive() {
  await new Promise((r) => setTimeout(r, 0));
  while (liveQueue.length) {
    const batch = liveQueue;
    liveQueue = [];
    const view = current;
    if (!view) continue;
    const s = ui.scroller;
    const atBottom = s.scrollHeight - s.scrollTop - s.clientHeight < 80;
    const fresh = [];
    for (const m of batch) {
      if (m.hoomi_id !== view.id || view.bySeq.has(m.seq)) continue;
      const li = makeItem(m);
      view.bySeq.set(m.seq, li);
      fresh.push([li, m]);
    }
    let last = ui.list.lastElementChild;
    while (last && !last.dataset.seq) last = last.previousElementSibling; // skip "sending…"
    const ordered = fresh.every(([, m], i) => i === 0 || fresh[i - 1][1].seq < m.seq);
    if (fresh.length && ordered && (!last || Number(last.dataset.seq) < fresh[0][1].seq)) {
      const frag = document.createDocumentFragment();
      for (const [li] of fresh) frag.append(li);
      ui.list.insertBefore(frag, ui.list.querySelector("li.pending"));
    } else {
      for (const [li, m] of fresh) place(li, m.seq);
    }
    await Promise.all(fresh.map(([li, m]) => fillBody(li, m)));
    if (atBottom) s.scrollTop = s.scrollHeight;
  }
  flushing = null;
  maybeRead();
}

let hoomisScheduled = false;
function scheduleHoomis() {
  if (hoomisScheduled) return;
  hoomisScheduled = true;
  setTimeout(() => {
    hoomisScheduled = false;
    renderHoomis();
  }, 100);
}

function onDeleted(d) {
  const li = current?.id === d.hoomi_id ? current.bySeq.get(d.seq) : null;
  if (!li) return;
  li._message = { ...li._message, deleted: true, content: undefined, nonce: undefined };
  fillBody(li, li._message);
}

async function deleteMessage(m) {
  ui.roomError.textContent = "";
  try {
    await client.delete(m.hoomi_id, m.id); // the "deleted" push updates every tab
  } catch (err) {
    ui.roomError.textContent = `Could not delete: ${err.message}`;
  }
}

async function loadOlder() {
  const view = current;
  if (!view || view.loading || view.done) return;
  view.loading = true;
  ui.top.textContent = "Loading older messages…";
  ui.list.setAttribute("aria-busy", "true");
  try {
    const page = await client.history(view.id, { before: view.nextBefore, limit: PAGE });
    if (view !== current) return;
    const s = ui.scroller;
    const fromBottom = s.scrollHeight - s.scrollTop;
    const fresh = [];
    for (const m of page.messages) {
      if (view.bySeq.has(m.seq)) continue;
      const li = makeItem(m);
      view.bySeq.set(m.seq, li);
      fresh.push([li, m]);
    }
    // newest first in the page: build one fragment oldest first, put it at the top
    const frag = document.createDocumentFragment();
    for (let i = fresh.length - 1; i >= 0; i--) frag.append(fresh[i][0]);
    const first = ui.list.firstElementChild;
    if (first && fresh.length && Number(first.dataset.seq) < fresh[0][1].seq) {
      for (const [li, m] of fresh) place(li, m.seq); // a live push got in first: rare
    } else {
      ui.list.insertBefore(frag, first);
    }
    await Promise.all(fresh.map(([li, m]) => fillBody(li, m)));
    s.scrollTop = s.scrollHeight - fromBottom; // keep what the reader was looking at
    view.nextBefore = page.next_before;
    view.done = page.next_before == null;
    ui.top.textContent = view.done ? "The start of this Hoomi." : "";
  } catch (err) {
    ui.roomError.textContent = `Could not load older messages: ${err.message}`;
    ui.top.textContent = "";
  } finally {
    view.loading = false;
    ui.list.removeAttribute("aria-busy");
  }
}

/** Load older pages while `more()` holds, the history goes on and each page brings
 * something (a failed page stops the loop; the next scroll tries again). */
async function loadWhile(more) {
  const view = current;
  while (view && view === current && !view.done && more()) {
    const before = view.bySeq.size;
    await loadOlder();
    if (view.bySeq.size === before) return;
  }
}

/** Until the list fills the view (or the history ends), load older pages. */
function fillViewport() {
  return loadWhile(() => ui.scroller.scrollHeight <= ui.scroller.clientHeight + 200);
}

let scrolling = false;
ui.scroller.addEventListener("scroll", async () => {
  if (scrolling) return;
  scrolling = true;
  try {
    await loadWhile(() => ui.scroller.scrollTop < 400); // near the top: older pages
  } finally {
    scrolling = false;
  }
}, { passive: true });

// -- live signals: read receipts, typing, presence -----------------------------------------

let readTimer = null;
/** Tell the hub how far this user has read: the newest message, once it is on screen in a
 * visible tab. One read in flight at a time; a burst of messages becomes one read. */
function maybeRead() {
  if (readTimer || !current || !client || client.state !== "live") return;
  readTimer = setTimeout(async () => {
    readTimer = null;
    const view = current;
    const s = ui.scroller;
    const atBottom = s.scrollHeight - s.scrollTop - s.clientHeight < 80;
    if (!view || document.visibilityState !== "visible" || !atBottom || view.newest <= view.readSent) return;
    const seq = view.newest;
    try {
      view.readSent = await client.read(view.id, seq);
    } catch {
      // not connected or refused: the next message or scroll tries again
    }
  }, 250);
}

ui.scroller.addEventListener("scroll", () => maybeRead(), { passive: true });
document.addEventListener("visibilitychange", () => maybeRead());

function onReceipt(r) {
  const seen = receipts.get(r.hoomi_id) ?? new Map();
  seen.set(r.user_id, Math.max(seen.get(r.user_id) ?? 0, r.seq)); // never moves back
  receipts.set(r.hoomi_id, seen);
  if (current?.id === r.hoomi_id) renderReceipts();
}

function renderReceipts() {
  const seen = current ? receipts.get(current.id) : null;
  const others = seen ? [...seen].filter(([u]) => u !== client?.userId) : [];
  ui.receipts.textContent = others.length
    ? `Read by ${others.map(([u, seq]) => `${short(u)} up to #${seq}`).join(", ")}` : "";
}

function onTyping(t) {
  if (current?.id !== t.hoomi_id || t.user_id === client?.userId) return;
  typers.set(t.user_id, Date.now());
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOWN_MS + 50);
}

function renderTyping() {
  const now = Date.now();
  for (const [u, at] of typers) if (now - at > TYPING_SHOWN_MS) typers.delete(u);
  const names = [...typers.keys()].map(short);
  ui.typing.textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

let presenceTimer = null;
async function refreshPresence() {
  clearTimeout(presenceTimer);
  const view = current;
  if (!view || !client) return;
  presenceTimer = setTimeout(refreshPresence, PRESENCE_EVERY_MS);
  try {
    const online = await client.presence(view.id);
    if (view !== current) return;
    ui.presence.textContent = `Online: ${online.map((u) => (u === client.userId ? "you" : short(u))).join(", ")}`;
  } catch {
    // asked again on the next tick or reconnect
  }
}

function onEdited(e) {
  const li = current?.id === e.hoomi_id ? current.bySeq.get(e.seq) : null;
  if (!li || li._message.deleted) return;
  li._message = { ...li._message, content: e.content, nonce: e.nonce, session_id: e.session_id,
    scheme: e.scheme, updated_at: e.updated_at };
  if (!li.querySelector(".meta .edited")) {
    const mark = document.createElement("span");
    mark.className = "edited";
    mark.textContent = "edited";
    li.querySelector(".meta").append(mark);
  }
  fillBody(li, li._message);
}

ui.text.addEventListener("input", () => {
  if (current && ui.text.value) client?.typing(current.id);
});

// -- sending --------------------------------------------------------------------------

function addPending(hoomiId, clientMsgId, text) {
  if (!current || current.id !== hoomiId) return;
  const li = document.createElement("li");
  li.className = "mine pending";
  li.dataset.cmid = clientMsgId;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "sending…";
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text ?? "(an earlier message, sealed)";
  li.append(meta, body);
  ui.list.append(li);
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

function removePending(clientMsgId) {
  ui.list.querySelector(`li.pending[data-cmid="${clientMsgId}"]`)?.remove();
}

ui.composer.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = ui.text.value;
  if (!current || !text.trim()) return;
  ui.text.value = "";
  ui.roomError.textContent = "";
  const clientMsgId = crypto.randomUUID();
  addPending(current.id, clientMsgId, text);
  try {
    await client.send(current.id, text, { clientMsgId });
  } catch (err) {
    ui.roomError.textContent = `Not sent: ${err.message}`;
  } finally {
    removePending(clientMsgId);
  }
});

ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
