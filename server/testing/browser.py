"""A headless Chromium driving the web chat page (client/web, served by a hub at /chat/),
for tests/test_browser.py and bench/browser.py.

Debian's Chromium, driven by playwright-core through client/web/test/browser_driver.mjs:
one JSON command per stdin line, one answer per stdout line. `missing()` names what this
machine lacks for it (node, client/web/node_modules, chromium, the built page).
`open_chat(...)` logs a page in as a person would; `SHOWN` is the JS expression for the
[seq, text] pairs a page shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any
from uuid import UUID

from server.testing.replica import ROOT, Replica

WEB = ROOT / "client" / "web"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PASSPHRASE = "purple otter rides the tram"


def missing() -> list[str]:
    """What the browser needs and this machine lacks, each with how to get it."""
    return [what for what, ok in [
        ("node (apt-get install nodejs npm)", shutil.which("node") is not None),
        ("client/web/node_modules (make test runs npm ci --prefix client/web)",
         (WEB / "node_modules" / "playwright-core").is_dir()),
        (f"chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)",
         Path(CHROMIUM).exists()),
        ("the built page client/web/dist (make web)", (WEB / "dist" / "app.js").is_file()),
    ] if not ok]


class Browser:
    """One Chromium, its pages named; every call is one JSON line to the driver."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lock = asyncio.Lock()

    @classmethod
    async def launch(cls) -> Browser:
        proc = await asyncio.create_subprocess_exec(
            "node", str(WEB / "test" / "browser_driver.mjs"), cwd=WEB,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "CHROMIUM": CHROMIUM}, limit=1 << 24)
        return cls(proc)

    async def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        assert line, "the browser driver exited"
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"browser {op} {args.get('page')}: {answer['error']}")
        return answer["ok"]

    async def eval(self, page: str, js: str) -> Any:
        return await self.call("eval", page=page, js=js)

    async def wait(self, page: str, js: str, timeout: float = 20) -> Any:
        return await self.call("wait", page=page, js=js, timeout=int(timeout * 1000))

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


SHOWN = """[...document.querySelectorAll('#messages li[data-seq]')].map(li =>
    [Number(li.dataset.seq), li.querySelector('.body').textContent])"""


async def open_chat(b: Browser, page: str, served_by: Replica, token: str,
                    ws_urls: list[str], hoomi: UUID, passphrase: str | None = PASSPHRASE,
                    reload: bool = False) -> None:
    """Open the page as a person would: paste the token, connect, pick the Hoomi, and
    (seeing that its key is missing) type its passphrase. `reload`: the page is open
    already; reload it (its IndexedDB stays) instead of opening a new one."""
    if reload:
        assert await b.call("reload", page=page) == 200
    else:
        await b.call("open", page=page, url=served_by.http + "/chat/")
    await b.call("fill", page=page, selector="#token", value=token)
    await b.call("fill", page=page, selector="#urls", value=" ".join(ws_urls))
    await b.call("click", page=page, selector="#connect-button")
    await b.wait(page, "!document.getElementById('chat').hidden")
    await b.call("click", page=page, selector=f'button[data-hoomi="{hoomi}"]')
    missing = await b.wait(page, "document.getElementById('key-missing').textContent")
    assert "No key for this Hoomi" in missing
    if passphrase is not None:
        await b.call("fill", page=page, selector="#passphrase", value=passphrase)
        await b.call("press", page=page, selector="#passphrase", value="Enter")
        await b.wait(page, "!document.getElementById('text').disabled")
