// The test vectors, read from docs/encryption.md itself so they cannot drift apart.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const DOC = fileURLToPath(new URL("../../../docs/encryption.md", import.meta.url));

/** The fields of the ```text block after `<!-- NAME: ... -->`: name -> hex string. */
export function vector(name) {
  const text = readFileSync(DOC, "utf8");
  const at = text.indexOf(`<!-- ${name}:`);
  if (at < 0) throw new Error(`docs/encryption.md has no ${name}`);
  const start = text.indexOf("```text\n", at) + "```text\n".length;
  const block = text.slice(start, text.indexOf("```", start));
  const fields = {};
  let current = null;
  for (const raw of block.split("\n")) {
    const line = raw.replace(/#.*$/, "").trimEnd();
    if (!line.trim()) continue;
    const m = /^(\S+)\s+(.*)$/.exec(line);
    if (m && !/^\s/.test(raw)) {
      current = m[1];
      fields[current] = m[2].replace(/\s+/g, "");
    } else if (current) {
      fields[current] += line.trim().replace(/\s+/g, "");
    }
  }
  return fields;
}
