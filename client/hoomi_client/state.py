"""What a client must remember across restarts: the last seq seen per Hoomi (to resume)
and the outbox of sends not yet acked (to resend them under the same client_msg_id).

Saved atomically (write, fsync, rename, fsync of the directory) before a send leaves
and after its ack, so a client killed at any point resends exactly what the hub may not
have stored, and the hub's idempotency turns a resend of a stored message into its
original ack.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID


@dataclass
class Outgoing:
    hoomi_id: UUID
    client_msg_id: UUID
    content: bytes
    nonce: bytes
    session_id: str
    scheme: int = 1
    tokens: tuple[bytes, ...] = ()


@dataclass
class ClientState:
    path: Path | None = None
    last_seq: dict[UUID, int] = field(default_factory=dict)
    outbox: dict[UUID, Outgoing] = field(default_factory=dict)  # by client_msg_id

    @classmethod
    def load(cls, path: Path | None) -> ClientState:
        if path is None or not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        state = cls(path, {UUID(k): int(v) for k, v in data.get("last_seq", {}).items()})
        for o in data.get("outbox", []):
            out = Outgoing(UUID(o["hoomi_id"]), UUID(o["client_msg_id"]),
                           base64.b64decode(o["content"]), base64.b64decode(o["nonce"]),
                           o["session_id"], int(o.get("scheme", 1)),
                           tuple(base64.b64decode(t) for t in o.get("tokens", ())))
            state.outbox[out.client_msg_id] = out
        return state

    def save(self) -> None:
        if self.path is None:
            return
        data = {
            "last_seq": {str(k): v for k, v in self.last_seq.items()},
            "outbox": [{"hoomi_id": str(o.hoomi_id), "client_msg_id": str(o.client_msg_id),
                        "content": base64.b64encode(o.content).decode(),
                        "nonce": base64.b64encode(o.nonce).decode(),
                        "session_id": o.session_id, "scheme": o.scheme,
                        "tokens": [base64.b64encode(t).decode() for t in o.tokens]}
                       for o in self.outbox.values()],
        }
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # The rename itself must survive a power cut, or the outbox could come back
        # without a send that already left.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
