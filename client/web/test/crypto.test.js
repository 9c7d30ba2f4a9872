import assert from "node:assert/strict";
import { test } from "node:test";

import {
  DecryptError, GroupKey, HEADER_BYTES, Keyring, MAX_PLAINTEXT, associatedData, decrypt,
  encrypt, envelope, fromHex, keyFromPassphrase, maxPlaintext, newUuid, parseKeyFile,
  passphraseBytes, toHex,
} from "../src/index.js";
import { vector } from "./vectors.js";

const v = vector("message-vector");
const HOOMI = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
const SENDER = "0b5f3e8c-1d2a-4c6b-9e7f-5a4b3c2d1e0f";
const CMID = "5e1d9c7a-2b3f-4e8d-a1c6-7f9e0d3b2a14";

async function vectorKey() {
  return GroupKey.fromBytes(v.session_id, fromHex(v.key));
}

test("the message vector of docs/encryption.md: AD, envelope and content byte for byte", async () => {
  assert.equal(v.hoomi_id, HOOMI);
  assert.equal(v.sender_id, SENDER);
  assert.equal(v.client_msg_id, CMID);
  assert.equal(toHex(associatedData(HOOMI, "k1")), v.ad);
  assert.equal(toHex(envelope(CMID, SENDER, fromHex(v.body))), v.envelope);
  const sealed = await encrypt(await vectorKey(), HOOMI, SENDER, CMID, fromHex(v.body),
    { nonce: fromHex(v.nonce) });
  assert.equal(toHex(sealed.content), v.content);
  assert.equal(sealed.content.length, 80);
  assert.equal(sealed.sessionId, "k1");
});

test("the vector opens with its sender or a null sender, and is tampered under any other", async () => {
  const key = await vectorKey();
  for (const sender of [SENDER, null]) {
    const opened = await decrypt(key, HOOMI, sender, fromHex(v.content), fromHex(v.nonce), "k1");
    assert.equal(new TextDecoder().decode(opened.body), "hi");
    assert.equal(opened.clientMsgId, CMID);
    assert.equal(opened.senderId, SENDER);
  }
  await assert.rejects(decrypt(key, HOOMI, newUuid(), fromHex(v.content), fromHex(v.nonce), "k1"),
    (e) => e instanceof DecryptError && e.reason === "tampered"
      && e.summary === "(cannot decrypt: tampered: sealed by another sender than the hub reports)");
});

test("the checks run in the documented order and give the documented reasons", async () => {
  const ring = new Keyring();
  ring.add(HOOMI, await vectorKey());
  const content = fromHex(v.content);
  const nonce = fromHex(v.nonce);
  const reason = async (...args) => {
    try {
      await decrypt(...args);
    } catch (e) {
      assert.ok(e instanceof DecryptError);
      assert.ok(!e.message.includes(v.key), "never the key in a message");
      return e.reason;
    }
    return "opened";
  };
  assert.equal(await reason(ring, HOOMI, SENDER, content, nonce, "k2"), "unknown_session");
  // unknown session is checked before anything about the bytes
  assert.equal(await reason(ring, HOOMI, SENDER, new Uint8Array(3), new Uint8Array(1), "k2"), "unknown_session");
  assert.equal(await reason(ring, HOOMI, SENDER, content, nonce.subarray(0, 11), "k1"), "malformed");
  assert.equal(await reason(ring, HOOMI, SENDER, content.subarray(0, 15), nonce, "k1"), "malformed");
  const flipped = content.slice();
  flipped[3] ^= 1;
  assert.equal(await reason(ring, HOOMI, SENDER, flipped, nonce, "k1"), "tampered");
  assert.equal(await reason(ring, newUuid(), SENDER, content, nonce, "k1"), "unknown_session");
  const other = new Keyring();
  other.add(HOOMI, await GroupKey.fromBytes("k1", new Uint8Array(32).fill(7)));
  assert.equal(await reason(other, HOOMI, SENDER, content, nonce, "k1"), "tampered");
  assert.equal(await reason(ring, HOOMI, SENDER, content, nonce, "k1"), "opened");
});

test("an authentic envelope that does not parse is malformed (version, length, padding)", async () => {
  const key = await vectorKey();
  const nonce = fromHex(v.nonce);
  const seal = async (env) => new Uint8Array(await crypto.subtle.encrypt(
    { name: "AES-GCM", iv: nonce, additionalData: associatedData(HOOMI, "k1") }, key.cryptoKey, env));
  const good = envelope(CMID, SENDER, new TextEncoder().encode("hi"));
  const cases = {
    version: (() => { const e = good.slice(); e[0] = 2; return e; })(),
    padding: (() => { const e = good.slice(); e[63] = 1; return e; })(),
    length: (() => { const e = good.slice(); e[36] = 40; return e; })(),
    short: good.slice(0, 32),
    unpadded: good.slice(0, 39),
  };
  for (const [name, env] of Object.entries(cases)) {
    await assert.rejects(decrypt(key, HOOMI, SENDER, await seal(env), nonce, "k1"),
      (e) => e.reason === "malformed", name);
  }
});

test("sizes: bodies of 0-27 bytes seal to 80, 28 to 112; the largest body fits 65536", async () => {
  const key = await vectorKey();
  const size = async (n) => (await encrypt(key, HOOMI, SENDER, newUuid(), new Uint8Array(n))).content.length;
  assert.equal(await size(0), 80);
  assert.equal(await size(27), 80);
  assert.equal(await size(28), 112);
  assert.equal(MAX_PLAINTEXT, 65467);
  assert.equal(await size(MAX_PLAINTEXT), 65520); // 65504-byte envelope + tag: within 65536
  await assert.rejects(encrypt(key, HOOMI, SENDER, newUuid(), new Uint8Array(MAX_PLAINTEXT + 1)), RangeError);
  assert.equal(maxPlaintext(1000), Math.floor(984 / 32) * 32 - HEADER_BYTES);
  // A fresh nonce for every message.
  const a = await encrypt(key, HOOMI, SENDER, CMID, "x");
  const b = await encrypt(key, HOOMI, SENDER, CMID, "x");
  assert.notEqual(toHex(a.nonce), toHex(b.nonce));
});

test("the passphrase vector: both spellings derive the documented key", async () => {
  const p = vector("passphrase-vector");
  const dec = new TextDecoder();
  const composed = dec.decode(fromHex(p.passphrase));
  const decomposed = dec.decode(fromHex(p.decomposed));
  assert.notEqual(composed, decomposed);
  assert.equal(toHex(await passphraseBytes(composed, p.hoomi_id)), p.key);
  assert.equal(toHex(await passphraseBytes(decomposed, p.hoomi_id)), p.key);
  const key = await keyFromPassphrase(composed, p.hoomi_id);
  assert.equal(key.sessionId, "pw1");
  await assert.rejects(keyFromPassphrase("", p.hoomi_id), RangeError);
});

test("key files: the doc's example loads; bad files are refused naming the entry, never a key", async () => {
  const example = JSON.stringify({ version: 1, hoomis: { [HOOMI]: [
    { session_id: "k1", key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=" },
    { session_id: "k2-3f9a0c1e", key: "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=" },
  ] } });
  const ring = await parseKeyFile(example);
  assert.equal(ring.current(HOOMI).sessionId, "k2-3f9a0c1e");
  const opened = await decrypt(ring, HOOMI, SENDER, fromHex(v.content), fromHex(v.nonce), "k1");
  assert.equal(opened.clientMsgId, CMID);
  const bad = [
    ["not json", /not JSON/],
    [JSON.stringify({ version: 2, hoomis: {} }), /not a version 1/],
    [JSON.stringify({ version: 1, hoomis: { nope: [] } }), /'nope': not a UUID/],
    [JSON.stringify({ version: 1, hoomis: { [HOOMI]: {} } }), /expected a list/],
    [JSON.stringify({ version: 1, hoomis: { [HOOMI]: [{ session_id: "k1", key: "AAEC-w==" }] } }), /key 1: key is not valid base64/],
    [JSON.stringify({ version: 1, hoomis: { [HOOMI]: [{ session_id: "k1", key: "AAEC" }] } }), /32 bytes/],
    [JSON.stringify({ version: 1, hoomis: { [HOOMI]: [{ session_id: "", key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=" }] } }), /session_id/],
    [JSON.stringify({ version: 1, hoomis: { [HOOMI]: [
      { session_id: "k1", key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=" },
      { session_id: "k1", key: "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=" }] } }), /key 2: .*another key/],
  ];
  for (const [text, re] of bad) {
    await assert.rejects(parseKeyFile(text, "keys.json"), (e) => {
      assert.match(e.message, re);
      assert.ok(!e.message.includes("AAECAwQF") && !e.message.includes("ICEiIyQl"));
      return e.name === "KeyFileError";
    });
  }
});

test("scheme 2: compressed above 256 bytes when smaller, bound into the AD, newer schemes refused", async () => {
  const key = await vectorKey();
  const text = "all work and no play makes jack a dull boy. ".repeat(40);
  const big = await encrypt(key, HOOMI, SENDER, CMID, text, { scheme: 2 });
  assert.equal(big.scheme, 2);
  assert.ok(big.content.length < 400, `compressed: ${big.content.length}`);
  const opened = await decrypt(key, HOOMI, SENDER, big.content, big.nonce, "k1", 2);
  assert.equal(new TextDecoder().decode(opened.body), text);
  assert.equal(opened.clientMsgId, CMID);
  const small = await encrypt(key, HOOMI, SENDER, CMID, "hi", { scheme: 2 });
  assert.equal(small.content.length, 80); // 38 + 2 -> 64, + tag
  assert.equal(new TextDecoder().decode((await decrypt(key, HOOMI, null, small.content, small.nonce, "k1", 2)).body), "hi");
  // The hub cannot relabel a message's scheme: it no longer authenticates.
  await assert.rejects(decrypt(key, HOOMI, SENDER, small.content, small.nonce, "k1", 1), (e) => e.reason === "tampered");
  const v1 = await encrypt(key, HOOMI, SENDER, CMID, "hi");
  await assert.rejects(decrypt(key, HOOMI, SENDER, v1.content, v1.nonce, "k1", 2), (e) => e.reason === "tampered");
  await assert.rejects(decrypt(key, HOOMI, SENDER, v1.content, v1.nonce, "k1", 3),
    (e) => e.reason === "malformed" && e.summary.includes("scheme 3, newer than this client"));
  await assert.rejects(encrypt(key, HOOMI, SENDER, CMID, "x", { scheme: 3 }), RangeError);
});
