// The outbox: sealed sends not yet acked, kept so that a reload, a crash of the tab or a
// reconnect resends the *same bytes* under the *same client_msg_id* (the hub stores a
// client_msg_id once: exactly-once). An entry is written before its first send and
// removed only after its ack, or when the hub refuses it for good.
//
// Entry: {clientMsgId, hoomiId, content (Uint8Array), nonce (Uint8Array), sessionId,
//         createdAt (ms), order (int, creation order)}. Never the plaintext.

/** In memory: for tests and for environments without IndexedDB (Node). */
export class MemoryOutbox {
  constructor() {
    this._entries = new Map();
  }

  async put(entry) {
    this._entries.set(entry.clientMsgId, { ...entry });
  }

  async remove(clientMsgId) {
    this._entries.delete(clientMsgId);
  }

  async all() {
    return [...this._entries.values()].sort((a, b) => a.order - b.order);
  }

  close() {}
}

function promised(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
  });
}

/**
 * In IndexedDB, one database per (hub, user): `name` should name both, e.g.
 * `hoomi-outbox:${user_id}`. A put resolves once its transaction committed, so an entry
 * the client sent is on disk first.
 */
export class IndexedDbOutbox {
  static async open(name, indexedDB = globalThis.indexedDB) {
    if (!indexedDB) throw new Error("IndexedDB is not available here");
    const request = indexedDB.open(name, 1);
    request.onupgradeneeded = () => {
      request.result.createObjectStore("outbox", { keyPath: "clientMsgId" });
    };
    return new IndexedDbOutbox(await promised(request));
  }

  constructor(db) {
    this._db = db;
  }

  async put(entry) {
    const tx = this._db.transaction("outbox", "readwrite", { durability: "strict" });
    tx.objectStore("outbox").put(entry);
    await done(tx);
  }

  async remove(clientMsgId) {
    const tx = this._db.transaction("outbox", "readwrite");
    tx.objectStore("outbox").delete(clientMsgId);
    await done(tx);
  }

  async all() {
    const tx = this._db.transaction("outbox", "readonly");
    const rows = await promised(tx.objectStore("outbox").getAll());
    return rows.sort((a, b) => a.order - b.order);
  }

  close() {
    this._db.close();
  }
}
