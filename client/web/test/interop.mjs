// Interoperability helper for tests/test_web_interop.py: reads a JSON job on stdin, seals
// and opens with this SDK, prints the results as JSON. Bytes travel as base64.
//   {key, session_id, hoomi_id,
//    seal: [{sender_id, client_msg_id, body, scheme?}],
//    open: [{sender_id, content, nonce, session_id, scheme?}],
//    passphrases: [{passphrase, hoomi_id}]}
// -> {sealed: [{content, nonce, session_id}], opened: [{body, client_msg_id, sender_id} |
//     {error: reason}], derived: [hex]}
import { Buffer } from "node:buffer";

import { GroupKey, Keyring, decrypt, encrypt, passphraseBytes, toHex } from "../src/index.js";

const b64 = (bytes) => Buffer.from(bytes).toString("base64");
const bytes = (text) => new Uint8Array(Buffer.from(text, "base64"));

let input = "";
for await (const chunk of process.stdin) input += chunk;
const job = JSON.parse(input);
const ring = new Keyring();
ring.add(job.hoomi_id, await GroupKey.fromBytes(job.session_id, bytes(job.key)));
const out = { sealed: [], opened: [], derived: [] };
for (const s of job.seal ?? []) {
  const sealed = await encrypt(ring.current(job.hoomi_id), job.hoomi_id, s.sender_id,
    s.client_msg_id, bytes(s.body), { scheme: s.scheme ?? 1 });
  out.sealed.push({ content: b64(sealed.content), nonce: b64(sealed.nonce), session_id: sealed.sessionId,
    scheme: sealed.scheme });
}
for (const o of job.open ?? []) {
  try {
    const opened = await decrypt(ring, job.hoomi_id, o.sender_id, bytes(o.content), bytes(o.nonce), o.session_id, o.scheme ?? 1);
    out.opened.push({ body: b64(opened.body), client_msg_id: opened.clientMsgId, sender_id: opened.senderId });
  } catch (err) {
    out.opened.push({ error: err.reason ?? String(err) });
  }
}
for (const p of job.passphrases ?? []) out.derived.push(toHex(await passphraseBytes(p.passphrase, p.hoomi_id)));
process.stdout.write(JSON.stringify(out));
