export * from "./crypto.js";
export * from "./keys.js";
export * from "./outbox.js";
export * from "./client.js";
