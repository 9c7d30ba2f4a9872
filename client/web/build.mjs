// Builds the page the hub serves at /chat/ into dist/: index.html and style.css copied,
// app.js bundled with the SDK, @msgpack/msgpack and @noble/hashes from node_modules (no
// CDN: the page's Content-Security-Policy allows scripts from its own origin only).
// dist/ is committed, so the hub serves the page without Node; `make web` rebuilds it and
// test/build.test.js checks the committed files are what this build makes.
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { build as esbuild } from "esbuild";

const HERE = dirname(fileURLToPath(import.meta.url));

export async function build(outdir = join(HERE, "dist")) {
  mkdirSync(outdir, { recursive: true });
  const result = await esbuild({
    entryPoints: [join(HERE, "page", "app.js")],
    bundle: true, format: "esm", target: "es2022", minify: true, legalComments: "eof",
    charset: "utf8", write: false, absWorkingDir: HERE,
  });
  writeFileSync(join(outdir, "app.js"), result.outputFiles[0].contents);
  for (const f of ["index.html", "style.css"]) copyFileSync(join(HERE, "page", f), join(outdir, f));
  return outdir;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const out = await build(process.argv[2]);
  console.log(`built ${out}`);
}
