import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { build } from "../build.mjs";

const DIST = fileURLToPath(new URL("../dist", import.meta.url));

test("the committed page (dist/) is what `make web` builds from page/ and src/", async () => {
  const out = mkdtempSync(join(tmpdir(), "hoomi-web-"));
  try {
    await build(out);
    assert.deepEqual(readdirSync(out).sort(), readdirSync(DIST).sort());
    for (const f of readdirSync(out)) {
      assert.ok(readFileSync(join(out, f)).equals(readFileSync(join(DIST, f))),
        `dist/${f} is stale: run make web and commit it`);
    }
    const app = readFileSync(join(out, "app.js"), "utf8");
    assert.ok(!/https?:\/\/(?!www\.w3\.org)[a-z0-9.-]+\//i.test(app.replace(/\/\*[\s\S]*?\*\//g, "")),
      "no script is fetched from elsewhere");
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
