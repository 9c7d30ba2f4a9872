"""A client process for the kill-and-restart test: sends `count` numbered messages through
the SDK with a persistent state file, many in flight at once. Killed and started again
with the same arguments, it resends its outbox and goes on from where it stopped.

Message i is sent under client_msg_id uuid5(hoomi, i): killed after the SDK saved a send
but before `.next` recorded it, the restart sends message i again under the same id and
the hub answers with the original ack instead of storing a copy."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from uuid import UUID, uuid5

from hoomi_client.keys import load_key_file
from hoomi_client.sdk import HoomiClient


def write_atomically(path: Path, text: str) -> None:
    """A reader sees the old number or the new one, never an empty file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def main(url: str, token: str, hoomi: str, keyfile: str, state: str, count: int) -> None:
    h = UUID(hoomi)
    progress = Path(state + ".next")
    start = int(progress.read_text()) if progress.exists() else 0
    client = HoomiClient(url, token, keyring=load_key_file(Path(keyfile)),
                         state_path=Path(state))
    await client.start()
    sends = []
    for i in range(start, count):
        sends.append(asyncio.ensure_future(
            client.send_text(h, f"message {i}".encode(), uuid5(h, str(i)))))
        await asyncio.sleep(0)  # the send above saved its outbox entry
        write_atomically(progress, str(i + 1))
        if len(sends) >= 20:
            await sends.pop(0)
    await asyncio.gather(*sends)
    # Resends of a previous run's outbox finish before we say we are done.
    await client.flush()
    await client.close()
    print("done", flush=True)


if __name__ == "__main__":
    url, token, hoomi, keyfile, state, count = sys.argv[1:7]
    asyncio.run(main(url, token, hoomi, keyfile, state, int(count)))
