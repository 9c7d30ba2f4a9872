"""One browser tab: messages per second it opens and renders, and its memory after
scrolling through 5 000 messages.

    .venv/bin/python -m bench.browser [--messages 5000] [--live 3000]

One `hoomi serve` replica (embedded PostgreSQL unless DATABASE_URL is set, no Redis) with
the per-socket send limits raised for the run, the page at /chat/ in headless Chromium
(Debian's, driven by playwright-core as in tests/test_browser.py), a passphrase key.

  scroll  --messages are stored first (Python SDK, pipelined); the tab opens the Hoomi and
          is scrolled to the top until every message is shown: history pages of 50 over
          the socket, each message opened with WebCrypto and put in the DOM. Then the tab's
          JS heap (after a forced GC) and DOM node count, with all of them in the page.
  live    with the tab showing the Hoomi, a Python SDK client sends --live more messages
          as fast as the hub acks them; the tab's rate is messages / (its last render -
          the start), beside the sender's ack rate: when the two are close the tab keeps up
          with the hub and the figure is a floor for the tab.
Everything shares the machine's 2 cores (the hub, PostgreSQL, Chromium, the sender).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from uuid import UUID

import httpx

from bench.common import fresh_database
from hoomi_client.keys import Keyring, key_from_passphrase
from hoomi_client.sdk import HoomiClient
from server.testing.browser import PASSPHRASE, SHOWN, Browser, open_chat
from server.testing.replica import ADMIN_TOKEN, Replica


async def setup(base: str) -> tuple[UUID, str, UUID]:
    """A user, their token and a Hoomi of theirs, through the operator API."""
    async with httpx.AsyncClient(base_url=base, headers={
            "Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        user = UUID((await http.post("/v1/admin/users", json={})).json()["id"])
        token = (await http.post("/v1/admin/tokens", json={
            "user_id": str(user), "ttl_seconds": 3600})).json()["token"]
        hoomi = UUID((await http.post("/v1/admin/hoomis", json={
            "members": [{"user_id": str(user), "role": "admin"}]})).json()["id"])
    return user, token, hoomi


async def send_all(sdk: HoomiClient, hoomi: UUID, n: int, prefix: str) -> float:
    """Send n messages pipelined (a few hundred in flight); returns the seconds taken."""
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        async with sem:
            await sdk.send_text(hoomi, f"{prefix} {i} — a message of about sixty bytes.".encode())
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--live", type=int, default=3000)
    args = ap.parse_args()
    async with fresh_database() as dsn:
        replica = Replica(dsn, None, name="bench-browser", HOOMI_SEND_RATE="100000",
                          HOOMI_SEND_BURST="100000", HOOMI_REQUEST_RATE="10000",
                          HOOMI_REQUEST_BURST="10000").start()
        browser = await Browser.launch()
        try:
            _, token, hoomi = await setup(replica.http)
            ring = Keyring()
            ring.add(hoomi, key_from_passphrase(PASSPHRASE, hoomi))
            # Its own pushes are not read here: room for all of them, so acks keep flowing.
            sdk = HoomiClient([replica.ws], token, keyring=ring,
                              max_events=args.messages + args.live + 100)
            await sdk.start()
            seeded = await send_all(sdk, hoomi, args.messages, "stored")
            print(f"stored {args.messages} messages in {seeded:.2f} s", flush=True)

            await open_chat(browser, "tab", replica, token, [replica.ws], hoomi)
            first = await browser.eval("tab", "window.hoomiPage.current.count")
            # A reader holding the scroll bar at the top: scrollTop = 0 again as soon as
            # the page has put the older page above (and moved the view back down).
            t0 = time.perf_counter()
            await browser.eval("tab", f"""(async () => {{
                const s = document.getElementById('scroller');
                const end = performance.now() + 600000;
                const page = window.hoomiPage;
                while (page.current.count < {args.messages} && performance.now() < end) {{
                    s.scrollTop = 0; await new Promise((r) => setTimeout(r, 5)); }}
                return true; }})()""")
            scroll_s = time.perf_counter() - t0
            shown = await browser.eval("tab", SHOWN)
            assert [s for s, _ in shown] == list(range(1, args.messages + 1)), "out of order"
            m = await browser.call("metrics", page="tab")
            heap_mib = m["JSHeapUsedSize"] / (1 << 20)
            total_mib = m["JSHeapTotalSize"] / (1 << 20)
            older = args.messages - first
            print(f"scroll: {older} older messages opened and rendered in {scroll_s:.2f} s "
                  f"= {older / scroll_s:,.0f} msg/s (history pages of 50; {first} were "
                  "shown on opening)")
            print(f"memory after {args.messages} messages: JS heap used {heap_mib:.1f} MiB "
                  f"(total {total_mib:.1f} MiB), {int(m['Nodes'])} DOM nodes, "
                  f"{int(m['JSEventListeners'])} listeners")

            # Live: the tab at the bottom, the sender flat out.
            await browser.eval("tab", """(() => { const s = document.getElementById('scroller');
                s.scrollTop = s.scrollHeight; return true; })()""")
            start = await browser.eval("tab", "performance.now()")
            sent_s = await send_all(sdk, hoomi, args.live, "live")
            total = args.messages + args.live
            await browser.wait("tab", f"window.hoomiPage.current.count === {total}", timeout=600)
            last = await browser.eval("tab", "window.hoomiPage.lastOpenedAt")
            tab_s = (last - start) / 1000
            print(f"live: {args.live} pushes opened and rendered in {tab_s:.2f} s = "
                  f"{args.live / tab_s:,.0f} msg/s; the sender's acks {args.live / sent_s:,.0f}"
                  f" msg/s ({sent_s:.2f} s)")
            m = await browser.call("metrics", page="tab")
            print(f"memory with {total} messages: JS heap used "
                  f"{m['JSHeapUsedSize'] / (1 << 20):.1f} MiB, {int(m['Nodes'])} DOM nodes")
            errors = await browser.call("errors", page="tab")
            assert errors == [], errors
            await sdk.close()
        finally:
            await browser.close()
            replica.stop()


if __name__ == "__main__":
    asyncio.run(main())
