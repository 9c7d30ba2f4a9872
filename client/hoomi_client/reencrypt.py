"""Move a whole Hoomi from one key and scheme to another: a Hoomi admin's device reads
every message still below the target scheme, opens it with the keys it holds, seals it
again with the new key and scheme, and sends the new versions in `reencrypt` batches
(SPEC §7.2).

    progress = await migrate_hoomi(client, hoomi_id, new_key, scheme=2,
                                   on_progress=print)

- Resumable by construction: what is left is what the hub lists with `scheme_below`, so
  running it again (after a crash, on another device of an admin) goes on where it
  stopped; nothing is kept on the client.
- Batches of at most 100 items, packed so each frame stays under the hub's frame limit.
- Optimistic: an item whose message was edited (or migrated by someone else) since it
  was read comes back in `skipped`; the next pass reads it again.
- Members keep chatting meanwhile. Give them the new key first (and the new scheme):
  what they send from then on is already above the target, so passes end; a message sent
  under the old scheme during the run is caught by the pass that follows it.
- The sender stays the sender: each message is sealed again under its original
  sender_id and client_msg_id, so readers still attribute it (client/hoomi_client/crypto.py).
- Search tokens are recomputed under the new key when the client has search on, and
  erased otherwise (tokens of the old key would match nothing a member can ask, and only
  leak).
- Every migrated message is an `edited` push to every member's sockets, this device's
  too: the app must keep reading `client.events()` meanwhile (a client that stops
  reading its pushes stops reading its socket, and with it the replies).
- A message the device cannot open (no key for its session, tampered) is counted in
  `unreadable` and left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from hoomi_protocol import MessageBody, ReencryptItem
from hoomi_protocol.limits import DEFAULT_LIMITS

from . import search as blind
from .crypto import DecryptError
from .keys import GroupKey
from .sdk import HoomiClient

MAX_ITEMS = DEFAULT_LIMITS.max_reencrypt_items
# An item's msgpack bytes besides its content and tokens (id, nonces, session_id, keys),
# with room to spare; each token adds its bytes and a 2-byte header.
ITEM_OVERHEAD = 160 + DEFAULT_LIMITS.max_session_id_chars
FRAME_ROOM = DEFAULT_LIMITS.max_frame_bytes - 1024


@dataclass
class Progress:
    updated: int = 0  # messages moved to the new key and scheme
    skipped: int = 0  # items the hub skipped (changed meanwhile: read again next pass)
    unreadable: int = 0  # messages this device could not open
    batches: int = 0
    passes: int = 0
    last_seq: int = 0  # how far the current pass has read
    unreadable_ids: set[UUID] = field(default_factory=set, repr=False)


async def migrate_hoomi(
    client: HoomiClient, hoomi_id: UUID, new_key: GroupKey, scheme: int, *,
    batch: int = MAX_ITEMS, on_progress: Callable[[Progress], None] | None = None,
    max_passes: int = 10,
) -> Progress:
    """Reencrypt every message of the Hoomi below `scheme` with `new_key`; returns the
    totals. The client's keyring must hold the old keys (to open) and should hold
    `new_key` too (to read the result)."""
    if not 1 <= batch <= MAX_ITEMS:
        raise ValueError(f"batch: 1 to {MAX_ITEMS}")
    progress = Progress()
    skey = blind.search_key(new_key, hoomi_id) if client.search_enabled else None
    for _ in range(max_passes):
        progress.passes += 1
        found = await _one_pass(client, hoomi_id, new_key, scheme, batch, skey, progress,
                                on_progress)
        if not found:
            break
    return progress


async def _one_pass(client: HoomiClient, hoomi_id: UUID, new_key: GroupKey, scheme: int,
                    batch: int, skey: bytes | None, progress: Progress,
                    on_progress: Callable[[Progress], None] | None) -> int:
    """One walk over what is left, oldest first; returns how many items it sent."""
    after, sent = 0, 0
    while True:
        page = await client.sync(hoomi_id, after, limit=MAX_ITEMS, scheme_below=scheme)
        items: list[ReencryptItem] = []
        size = 0
        for m in page.messages:
            item = _item(client, m, new_key, scheme, skey, progress)
            if item is None:
                continue
            cost = (len(item.content) + ITEM_OVERHEAD
                    + sum(len(t) + 2 for t in item.tokens or ()))
            if items and (len(items) == batch or size + cost > FRAME_ROOM):
                sent += await _send(client, hoomi_id, items, progress, on_progress)
                items, size = [], 0
            items.append(item)
            size += cost
        if items:
            sent += await _send(client, hoomi_id, items, progress, on_progress)
        if page.messages:
            after = progress.last_seq = page.messages[-1].seq
        if not page.has_more:
            return sent


def _item(client: HoomiClient, m: MessageBody, new_key: GroupKey, scheme: int,
          skey: bytes | None, progress: Progress) -> ReencryptItem | None:
    if m.deleted or m.content is None or m.nonce is None or m.id in progress.unreadable_ids:
        return None
    try:
        opened = client.open(m)
    except DecryptError:
        progress.unreadable += 1
        progress.unreadable_ids.add(m.id)
        return None
    sealed = client._seal(m.hoomi_id, opened.sealed_by, opened.client_msg_id,
                          opened.plaintext, scheme=scheme, key=new_key)
    tokens = () if skey is None else blind.message_tokens(
        skey, opened.plaintext.decode("utf-8", "replace"))
    return ReencryptItem(id=m.id, old_nonce=m.nonce, content=sealed.content,
                         nonce=sealed.nonce, session_id=sealed.session_id, scheme=scheme,
                         tokens=tokens)


async def _send(client: HoomiClient, hoomi_id: UUID, items: list[ReencryptItem],
                progress: Progress, on_progress: Callable[[Progress], None] | None) -> int:
    ack = await client.reencrypt(hoomi_id, items)
    progress.updated += ack.updated
    progress.skipped += len(ack.skipped)
    progress.batches += 1
    if on_progress is not None:
        on_progress(progress)
    return len(items)
