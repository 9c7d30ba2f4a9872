import assert from "node:assert/strict";
import { test } from "node:test";

import { decode } from "@msgpack/msgpack";

import {
  CLOSE_POLICY, HoomiClient, Keyring, MemoryOutbox, backoffDelay, GroupKey,
} from "../src/index.js";

test("full-jitter backoff stays under min(cap, base * 2^attempt) and spans it", () => {
  const top = (attempt) => backoffDelay(attempt, { baseMs: 250, capMs: 10000, random: () => 0.999999 });
  assert.ok(top(0) < 250 && top(0) > 249);
  assert.ok(top(3) < 2000 && top(3) > 1999);
  assert.ok(top(10) <= 10000 && top(10) > 9999);
  assert.ok(top(1000) <= 10000);
  assert.equal(backoffDelay(5, { random: () => 0 }), 0);
});

test("close policies follow docs/protocol.md's close code table", () => {
  assert.equal(CLOSE_POLICY[4400], "never");
  assert.equal(CLOSE_POLICY[1008], "never");
  assert.equal(CLOSE_POLICY[1009], "never");
  assert.equal(CLOSE_POLICY[4401], "token");
  assert.equal(CLOSE_POLICY[1013], "backoff");
  assert.equal(CLOSE_POLICY[4408], "resume");
  assert.equal(CLOSE_POLICY[1012], "resume");
});

test("the memory outbox keeps entries in the order they were made, until removed", async () => {
  const box = new MemoryOutbox();
  for (const [i, id] of ["c", "a", "b"].entries()) {
    await box.put({ clientMsgId: id, hoomiId: "h", content: new Uint8Array(80),
      nonce: new Uint8Array(12), sessionId: "k1", createdAt: 0, order: i });
  }
  assert.deepEqual((await box.all()).map((e) => e.clientMsgId), ["c", "a", "b"]);
  await box.remove("a");
  assert.deepEqual((await box.all()).map((e) => e.clientMsgId), ["c", "b"]);
});

/** Records what the client writes; the client under test drives it like a WebSocket. */
class Recorder {
  static last = null;
  constructor(url) {
    this.url = url;
    this.sent = [];
    Recorder.last = this;
    queueMicrotask(() => this.onopen?.());
  }
  send(data) {
    this.sent.push(decode(data));
  }
  close() {}
}

test("a client queues sends before its welcome, seals them once and keeps them in its outbox", async (t) => {
  const hoomi = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
  const keyring = new Keyring();
  keyring.add(hoomi, await GroupKey.fromBytes("k1", new Uint8Array(32).fill(1)));
  const outbox = new MemoryOutbox();
  const client = new HoomiClient(["ws://a/v1/ws", "ws://b/v1/ws"], "tok", {
    keyring, outbox, WebSocket: Recorder, pingMs: 1e6, signals: true });
  t.after(() => client.close());
  const started = client.start();
  await new Promise((r) => setTimeout(r, 10));
  const ws = Recorder.last;
  assert.deepEqual(ws.sent[0], { type: "hello", token: "tok", resume: {}, ref: "hello",
    features: ["signals", "batch"] });
  const { encode } = await import("@msgpack/msgpack");
  const push = (frame) => ws.onmessage({ data: encode(frame) });
  push({ type: "welcome", user_id: "0b5f3e8c-1d2a-4c6b-9e7f-5a4b3c2d1e0f",
    hoomis: [{ hoomi_id: hoomi, last_seq: 4, role: "member" }], ref: "hello" });
  await started;
  assert.equal(client.lastSeq.get(hoomi), 4);
  const sending = client.send(hoomi, "hello");
  await new Promise((r) => setTimeout(r, 10));
  const frame = ws.sent.at(-1);
  assert.equal(frame.type, "send");
  assert.equal((await outbox.all()).length, 1, "in the outbox before its ack");
  assert.equal((await outbox.all())[0].clientMsgId, frame.client_msg_id);
  // Pushes at or below the resume point are dropped; later ones delivered once.
  const seen = [];
  client.on("message", (m) => seen.push(m.seq));
  push({ type: "message", id: "m", hoomi_id: hoomi, seq: 4, sender_id: null, created_at: 1 });
  push({ type: "message", id: "m5", hoomi_id: hoomi, seq: 5, sender_id: client.userId,
    content: frame.content, nonce: frame.nonce, session_id: "k1", created_at: 1 });
  push({ type: "message", id: "m5", hoomi_id: hoomi, seq: 5, sender_id: client.userId,
    content: frame.content, nonce: frame.nonce, session_id: "k1", created_at: 1 });
  assert.deepEqual(seen, [5]);
  push({ type: "ack", ref: frame.ref, id: "m5", hoomi_id: hoomi, seq: 5, created_at: 1 });
  const ack = await sending;
  assert.equal(ack.seq, 5);
  assert.equal(ack.client_msg_id, frame.client_msg_id);
  await new Promise((r) => setTimeout(r, 0));
  assert.equal((await outbox.all()).length, 0, "removed after its ack");
  const opened = await client.open({ id: "m5", hoomi_id: hoomi, seq: 5, sender_id: client.userId,
    content: frame.content, nonce: frame.nonce, session_id: "k1" });
  assert.equal(opened.text, "hello");
  await assert.rejects(client.open({ id: "m6", hoomi_id: hoomi, seq: 6, sender_id: client.userId,
    content: frame.content, nonce: frame.nonce, session_id: "k1" }), (e) => e.reason === "replayed");
  // Signals: typing goes out at most once a second per Hoomi; pushes are named events;
  // a push type this SDK has no name for passes through as "push".
  assert.equal(client.typing(hoomi), true);
  assert.equal(client.typing(hoomi), false);
  assert.deepEqual(ws.sent.at(-1), { type: "typing", hoomi_id: hoomi });
  const seenEvents = [];
  for (const type of ["typing", "receipt", "edited", "push"]) client.on(type, (f) => seenEvents.push(f.type));
  push({ type: "typing", hoomi_id: hoomi, user_id: "x" });
  push({ type: "receipt", hoomi_id: hoomi, user_id: "x", seq: 5 });
  push({ type: "some_future_push", hoomi_id: hoomi });
  assert.deepEqual(seenEvents, ["typing", "receipt", "some_future_push"]);
  const reading = client.read(hoomi, 5);
  await new Promise((r) => setTimeout(r, 0));
  const readFrame = ws.sent.at(-1);
  assert.equal(readFrame.type, "read");
  push({ type: "ack", ref: readFrame.ref, hoomi_id: hoomi, seq: 5 });
  assert.equal(await reading, 5);
  const asking = client.presence(hoomi);
  await new Promise((r) => setTimeout(r, 0));
  push({ type: "presence", ref: ws.sent.at(-1).ref, hoomi_id: hoomi, user_ids: ["a", "b"] });
  assert.deepEqual(await asking, ["a", "b"]);
  client.close();
  assert.equal(client.state, "stopped");
});

test("under batch, one WebSocket message holding several frames is handled frame by frame, in order", async (t) => {
  const hoomi = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
  const { encode } = await import("@msgpack/msgpack");
  const stream = (...frames) => {
    const parts = frames.map((f) => encode(f));
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out.buffer; // as a browser WebSocket with binaryType "arraybuffer" gives it
  };
  const client = new HoomiClient("ws://a/v1/ws", "tok", { WebSocket: Recorder, pingMs: 1e6 });
  t.after(() => client.close());
  const events = [];
  client.on("welcome", (w) => events.push(`welcome ${w.hoomis[0].last_seq}`));
  client.on("message", (m) => events.push(`message ${m.seq}`));
  client.on("deleted", (d) => events.push(`deleted ${d.seq}`));
  client.on("push", (p) => events.push(p.type));
  const started = client.start();
  await new Promise((r) => setTimeout(r, 10));
  const ws = Recorder.last;
  assert.deepEqual(ws.sent[0].features, ["batch"], "the hello asks for batch by default");
  const msg = (seq) => ({ type: "message", id: `m${seq}`, hoomi_id: hoomi, seq, sender_id: null,
    created_at: 1 });
  // The welcome shares its message with the first pushes (the hub's resume), as the hub
  // sends them: one msgpack stream. A resend at or below the resume point is dropped.
  ws.onmessage({ data: stream(
    { type: "welcome", user_id: "0b5f3e8c-1d2a-4c6b-9e7f-5a4b3c2d1e0f", features: ["batch"],
      hoomis: [{ hoomi_id: hoomi, last_seq: 2, role: "member" }], ref: "hello" },
    msg(2), msg(3), { type: "deleted", hoomi_id: hoomi, id: "m3", seq: 3 }, msg(4),
    { type: "some_future_push" }, msg(4), msg(5)) });
  await started;
  assert.deepEqual(client.features, ["batch"]);
  assert.deepEqual(events, ["welcome 2", "message 3", "deleted 3", "message 4",
    "some_future_push", "message 5"]);
  // A request's reply in the middle of a stream resolves it; the frames around it still go.
  const asking = client.request("presence", { hoomi_id: hoomi });
  await new Promise((r) => setTimeout(r, 0));
  ws.onmessage({ data: stream(msg(6),
    { type: "presence", ref: ws.sent.at(-1).ref, hoomi_id: hoomi, user_ids: ["a"] }, msg(7)) });
  assert.deepEqual((await asking).user_ids, ["a"]);
  // One frame per message (a hub that did not take batch) still works.
  ws.onmessage({ data: encode(msg(8)) });
  assert.deepEqual(events.slice(6), ["message 6", "message 7", "message 8"]);
  assert.equal(client.lastSeq.get(hoomi), 8);
  // A listener that closes the client mid-stream: the frames after it are not handled.
  client.on("message", (m) => { if (m.seq === 9) client.close(); });
  ws.onmessage({ data: stream(msg(9), msg(10)) });
  assert.deepEqual(events.slice(9), ["message 9"]);
  assert.equal(client.state, "stopped");
});

test("batch: false leaves batch out of the hello", async (t) => {
  const client = new HoomiClient("ws://a/v1/ws", "tok", { WebSocket: Recorder, batch: false });
  t.after(() => client.close());
  client.start();
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(Recorder.last.sent[0].features, undefined);
});
