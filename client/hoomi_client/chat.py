"""`hoomi chat`: a line-based terminal chat on the reference SDK, for trying the hub.

    hoomi chat --token "$TOKEN" --hoomi HOOMI_ID --key-file keys.json
               # or --passphrase-env HOOMI_PASSPHRASE; --url ws://HOST:PORT/v1/ws

The hub is found as every `hoomi` command finds it (HOOMI_URL, else HOOMI_HOST and
HOOMI_PORT), unless --url names it. Type a line and Enter to send it (encrypted here).
A line starting with `/` is a command, never sent: /help, /more (older messages),
/delete SEQ (delete one of yours, or any as an admin), /edit SEQ TEXT (a new version of
one of yours), /search WORDS (messages holding every word, newest first), /quit.
Messages arriving on the socket are printed as they come, `#seq sender: text`; an edit
as `#seq sender (edited): text`. `--scheme 2` seals with scheme 2 (compression above
256 bytes); `--no-search` sends no search tokens (docs/encryption.md says what tokens
reveal to the hub).

Live signals: the chat tells the hub how far it has shown the Hoomi (`read`), prints
`-- read by X up to #N --` when another member's receipt comes, `-- X is typing… --`
(once per few seconds per member) when another client says so, and who is online when
it joins and on /who. A terminal reads whole lines, so it sends no `typing` itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

from hoomi_protocol import Deleted, Edited, Membership, MessageBody, Receipt, TypingNotice

from .crypto import DecryptError
from .keys import PASSPHRASE_SESSION, Keyring, key_from_passphrase, load_key_file
from .locate import hub_ws_url
from .sdk import Closed, HoomiClient, HubError

HELP = """\
-- type a line and Enter to send it, end-to-end encrypted. Commands (never sent):
--   /more        older messages
--   /delete SEQ  delete message #SEQ (yours, or any as an admin)
--   /edit SEQ TEXT   replace your message #SEQ with TEXT
--   /search WORDS    messages holding every word (accents and case do not matter)
--   /who         who is online in this hoomi
--   /help        this help
--   /quit        leave (or Ctrl-D)
-- a line that starts with / is taken as a command; start it with // to send a
-- message that begins with / (one / is dropped)"""


class Chat:
    def __init__(self, client: HoomiClient, hoomi: UUID) -> None:
        self.client = client
        self.hoomi = hoomi
        self.oldest: int | None = None
        self.ids: dict[int, UUID] = {}
        self.senders: dict[int, UUID | None] = {}
        self.deleted: set[int] = set()
        self.shown = 0  # the highest seq shown: what the hub is told was read
        self.read_sent = 0
        self.to_read = asyncio.Event()
        self.typists: dict[UUID, float] = {}  # member -> when "is typing" was printed

    def who(self, sender: UUID | None) -> str:
        return "me" if sender == self.client.user_id else (
            str(sender)[:8] if sender else "(deleted user)")

    def edited(self, e: Edited) -> str | None:
        """An `edited` push as a line; None for a message deleted meanwhile."""
        if e.seq in self.deleted:
            return None
        sender = self.senders.get(e.seq)
        try:
            text = self.client.open_edited(e, sender).plaintext.decode("utf-8", "replace")
        except DecryptError as err:
            text = f"(cannot decrypt: {err.summary})"
        return f"#{e.seq} {self.who(sender)} (edited): {text}"

    async def search(self, words: str) -> None:
        page = await self.client.search_text(self.hoomi, words, limit=20)
        if not page.messages:
            print("-- nothing found --", flush=True)
        for m in page.messages:
            print(self.line(m), flush=True)
        if page.next_before is not None:
            print("-- more matches are older (showing the 20 newest) --", flush=True)

    def line(self, m: MessageBody) -> str:
        self.ids[m.seq] = m.id
        self.senders[m.seq] = m.sender_id
        if m.deleted:
            self.deleted.add(m.seq)
        who = "me" if m.sender_id == self.client.user_id else (
            str(m.sender_id)[:8] if m.sender_id else "(deleted user)")
        if m.deleted:
            return f"#{m.seq} {who}: (deleted)"
        try:
            text = self.client.open(m).plaintext.decode("utf-8", errors="replace")
        except DecryptError as err:
            text = f"(cannot decrypt: {err.summary})"
        return f"#{m.seq} {who}: {text}"

    async def more(self, limit: int = 20) -> None:
        if self.oldest == 0:
            print("-- start of history --", flush=True)
            return
        page = await self.client.history(self.hoomi, self.oldest, limit)
        for m in reversed(page.messages):
            print(self.line(m), flush=True)
        self.oldest = page.next_before if page.next_before is not None else 0
        if self.oldest == 0:
            print("-- start of history --", flush=True)

    def saw(self, seq: int) -> None:
        if seq > self.shown:
            self.shown = seq
            self.to_read.set()

    async def reads(self) -> None:
        """Tell the hub what was shown, one `read` at a time (a burst becomes one)."""
        while True:
            await self.to_read.wait()
            self.to_read.clear()
            if self.shown > self.read_sent:
                seq = self.shown
                try:
                    self.read_sent = await self.client.read(self.hoomi, seq)
                except HubError as err:
                    print(f"-- {err} --", flush=True)
                except Closed:
                    return  # the client stopped: pushes() says so

    async def who_is_online(self) -> None:
        users = await self.client.presence(self.hoomi)
        print("-- online: " + ", ".join(sorted(self.who(u) for u in users)) + " --",
              flush=True)

    def signal(self, ev: Receipt | TypingNotice) -> None:
        if ev.user_id == self.client.user_id:
            return  # our own other device
        if isinstance(ev, Receipt):
            print(f"-- read by {self.who(ev.user_id)} up to #{ev.seq} --", flush=True)
            return
        now = time.monotonic()
        if now - self.typists.get(ev.user_id, float("-inf")) >= 5.0:
            self.typists[ev.user_id] = now
            print(f"-- {self.who(ev.user_id)} is typing… --", flush=True)

    async def pushes(self) -> None:
        async for ev in self.client.events():
            if isinstance(ev, MessageBody) and ev.hoomi_id == self.hoomi:
                print(self.line(ev), flush=True)
                if ev.sender_id is not None:
                    self.typists.pop(ev.sender_id, None)  # said it: typing news again
                self.saw(ev.seq)
            elif isinstance(ev, Receipt | TypingNotice) and ev.hoomi_id == self.hoomi:
                self.signal(ev)
            elif isinstance(ev, Deleted) and ev.hoomi_id == self.hoomi:
                self.deleted.add(ev.seq)
                print(f"#{ev.seq} was deleted", flush=True)
            elif isinstance(ev, Edited) and ev.hoomi_id == self.hoomi:
                shown = self.edited(ev)
                if shown is not None:
                    print(shown, flush=True)
            elif isinstance(ev, Membership) and ev.hoomi_id == self.hoomi:
                print(f"-- you {ev.state} this hoomi --", flush=True)

    async def typing(self) -> None:
        lines = _stdin_lines()
        while True:
            raw = await lines.get()
            if not raw:
                return
            text = raw.rstrip("\r\n")
            try:
                if text.startswith("//"):
                    await self.client.send_text(self.hoomi, text[1:].encode("utf-8"))
                    continue
                if not text.startswith("/"):
                    if text:
                        await self.client.send_text(self.hoomi, text.encode("utf-8"))
                    continue
                command, *rest = text.split()
                if command == "/quit" and not rest:
                    return
                if command == "/more" and not rest:
                    await self.more()
                elif command == "/delete" and len(rest) == 1 and rest[0].isdigit():
                    seq = int(rest[0])
                    if seq not in self.ids:
                        print(f"-- #{seq} is not on screen --", flush=True)
                    else:
                        await self.client.delete(self.hoomi, self.ids[seq])
                elif command == "/edit" and len(rest) >= 2 and rest[0].isdigit():
                    seq = int(rest[0])
                    if seq not in self.ids:
                        print(f"-- #{seq} is not on screen --", flush=True)
                    else:
                        new = text.split(None, 2)[2]
                        await self.client.edit_text(self.hoomi, self.ids[seq],
                                                    new.encode("utf-8"))
                elif command == "/who" and not rest:
                    await self.who_is_online()
                elif command == "/search" and rest:
                    await self.search(text.split(None, 1)[1])
                else:
                    if command != "/help":
                        print(f"-- not a command: {text[:40]}; nothing was sent --",
                              flush=True)
                    print(HELP, flush=True)
            except (HubError, ValueError) as err:
                print(f"-- {err} --", flush=True)


def _stdin_lines() -> asyncio.Queue[str]:
    """Lines typed on stdin ('' at its end), read by a daemon thread: a reader parked in
    readline() must not keep the process alive once the chat has ended (an executor
    thread would: asyncio.run waits for it at exit)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        while True:
            raw = sys.stdin.readline()
            loop.call_soon_threadsafe(lines.put_nowait, raw)
            if not raw:
                return

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return lines


async def _unreachable(url: str) -> str | None:
    """Why nothing answers at the URL's host and port (refused, unresolvable), or None:
    said at once, rather than after the client's 30 s wait for a welcome."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError:
        return "not a valid port"
    if not parts.hostname:
        return "no host in the URL"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), 10)
    except (TimeoutError, OSError) as err:
        return str(err) or type(err).__name__
    writer.close()
    return None


async def run(args: argparse.Namespace) -> int:
    hoomi = UUID(args.hoomi)
    if args.key_file:
        ring = load_key_file(Path(args.key_file))
    else:
        passphrase = os.environ.get(args.passphrase_env or "")
        if not passphrase:
            print("hoomi chat: give --key-file or --passphrase-env NAME", file=sys.stderr)
            return 2
        ring = Keyring()
        ring.add(hoomi, key_from_passphrase(passphrase, hoomi, args.session))
    token = args.token or os.environ.get("HOOMI_TOKEN", "")
    url = args.url or hub_ws_url()
    unreachable = await _unreachable(url)
    if unreachable:
        print(f"hoomi chat: cannot reach the hub at {url} ({unreachable}); is `hoomi serve` "
              "running? It is found at --url, else HOOMI_URL, else HOOMI_HOST:HOOMI_PORT: "
              "export the same HOOMI_PORT as in the hub's terminal", file=sys.stderr)
        return 1
    client = HoomiClient(url, token, keyring=ring, scheme=args.scheme,
                         search=not args.no_search, signals=True)
    try:
        welcome = await client.start()
    except Exception as err:
        print(f"hoomi chat: cannot join the hub at {url}: {err or type(err).__name__} "
              "(the hub is found at --url, else HOOMI_URL, else HOOMI_HOST:HOOMI_PORT: "
              "export the same HOOMI_PORT as in the hub's terminal)", file=sys.stderr)
        await client.close()
        return 1
    if hoomi not in {h.hoomi_id for h in welcome.hoomis}:
        print("hoomi chat: you are not a member of this hoomi", file=sys.stderr)
        await client.close()
        return 1
    # The live stream starts after what history shows.
    chat = Chat(client, hoomi)
    print(f"-- joined {hoomi} as {client.user_id}; /help for commands, /quit to leave --",
          flush=True)
    read_before = client.read_seq(hoomi)
    await chat.more()
    last = next(h.last_seq for h in welcome.hoomis if h.hoomi_id == hoomi)
    if last > read_before:
        print(f"-- {last - read_before} new since you last read (after #{read_before}) --",
              flush=True)
    chat.saw(last)
    try:
        await chat.who_is_online()
    except HubError as err:
        print(f"-- {err} --", flush=True)
    reads = asyncio.ensure_future(chat.reads())
    pushes = asyncio.ensure_future(chat.pushes())
    typing = asyncio.ensure_future(chat.typing())
    await asyncio.wait({pushes, typing}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if pushes.done() and not pushes.cancelled() and pushes.exception() is not None:
        # The client stopped for good (its token expired or was refused): say so and end,
        # rather than sit there with a dead socket.
        print(f"-- disconnected: {pushes.exception()}; join again with a new token --",
              flush=True)
        code = 1
    for task in (pushes, typing, reads):
        task.cancel()
    await client.close()
    return code


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`hoomi chat` in the server's command line."""
    _arguments(sub.add_parser("chat", help=_HELP))


_HELP = "a terminal chat in one hoomi (end-to-end encrypted)"


def _arguments(p: argparse.ArgumentParser) -> None:
    """The chat's options; the hub is found as every command finds it (`locate`)."""
    p.add_argument("--url", help="the hub's WebSocket URL (default: from HOOMI_URL, else "
                                 "HOOMI_HOST and HOOMI_PORT, as every hoomi command)")
    p.add_argument("--token", help="user token (default: $HOOMI_TOKEN)")
    p.add_argument("--hoomi", required=True)
    p.add_argument("--key-file")
    p.add_argument("--passphrase-env", metavar="NAME",
                   help="environment variable holding the shared passphrase")
    p.add_argument("--session", default=PASSPHRASE_SESSION,
                   help="session_id of the passphrase key (default %(default)s); a new "
                        "passphrase needs a new name")
    p.add_argument("--scheme", type=int, choices=[1, 2], default=1,
                   help="encryption scheme to seal with (default %(default)s; 2 compresses "
                        "messages of 256 bytes or more)")
    p.add_argument("--no-search", action="store_true",
                   help="send no search tokens with messages (/search then finds only "
                        "messages others indexed)")
    p.set_defaults(fn=lambda a: sys.exit(asyncio.run(run(a))))


def main(argv: list[str] | None = None) -> None:
    """`hoomi-chat`: the same chat from the client package alone (no server installed)."""
    parser = argparse.ArgumentParser(prog="hoomi-chat", description=_HELP)
    _arguments(parser)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
