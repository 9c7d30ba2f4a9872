// Drives headless Chromium (Debian's /usr/bin/chromium, or $CHROMIUM) with playwright-core
// for tests/test_browser.py and bench/browser.py: one JSON command per stdin line, one
// JSON answer per stdout line ({ok: value} or {error: text}). Pages are named.
//   {op: "open", page, url}            a new context (its own IndexedDB) and page
//   {op: "reload", page}               the same context: its IndexedDB stays
//   {op: "fill"|"click"|"press", page, selector, value?}
//   {op: "eval", page, js}             js: an expression (may be async), its JSON value
//   {op: "wait", page, js, timeout}    until the expression is truthy; its value
//   {op: "screenshot", page, path}
//   {op: "metrics", page}              JS heap and DOM sizes from the Chrome DevTools Protocol
//   {op: "errors", page}               console errors and CSP violations seen so far
import { createInterface } from "node:readline";

import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
});
const pages = new Map();

async function open({ page: name, url, width = 1000, height = 700 }) {
  const context = await browser.newContext({ viewport: { width, height } });
  const page = await context.newPage();
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  pages.set(name, { page, context, errors });
  await page.goto(url);
  return page.url();
}

const ops = {
  open,
  reload: ({ page }) => pages.get(page).page.reload().then((r) => r?.status()),
  fill: ({ page, selector, value }) => pages.get(page).page.fill(selector, value),
  click: ({ page, selector }) => pages.get(page).page.click(selector),
  press: ({ page, selector, value }) => pages.get(page).page.press(selector, value),
  eval: ({ page, js }) => pages.get(page).page.evaluate(`(async () => (${js}))()`),
  // Polled with evaluate (the DevTools protocol), not waitForFunction: the page's CSP
  // forbids eval, which waitForFunction's string form needs.
  wait: async ({ page, js, timeout = 20000 }) => {
    const p = pages.get(page).page;
    const deadline = Date.now() + timeout;
    let value;
    for (;;) {
      value = await p.evaluate(`(async () => (${js}))()`);
      if (value) return value;
      if (Date.now() > deadline) throw new Error(`timeout after ${timeout} ms waiting for ${js.slice(0, 300)} (last value ${JSON.stringify(value)})`);
      await new Promise((r) => setTimeout(r, 50));
    }
  },
  screenshot: ({ page, path }) => pages.get(page).page.screenshot({ path }),
  metrics: async ({ page }) => {
    const p = pages.get(page).page;
    const cdp = await p.context().newCDPSession(p);
    await cdp.send("HeapProfiler.collectGarbage");
    await cdp.send("Performance.enable");
    const { metrics } = await cdp.send("Performance.getMetrics");
    return Object.fromEntries(metrics.map((m) => [m.name, m.value]));
  },
  errors: ({ page }) => pages.get(page).errors,
  close: async ({ page }) => {
    await pages.get(page)?.context.close();
    pages.delete(page);
  },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const cmd = JSON.parse(line);
    const value = await ops[cmd.op](cmd);
    answer = { ok: value ?? null };
  } catch (err) {
    answer = { error: String(err?.message ?? err).slice(0, 2000) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await browser.close();
