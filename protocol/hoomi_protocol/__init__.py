"""Protocol v1 of the Hoomi hub: frames, codec, limits and error codes.

Invariant: pure code. Bytes in, typed frames out (and back); no I/O, no asyncio, and no
imports from server/, storage/ or client/ (they import this package, never the reverse).
"""

from .codec import (
    client_frame,
    decode_client,
    decode_server,
    decode_server_stream,
    encode_body_map,
    encode_body_maps,
    encode_client,
    encode_server,
    split_stream,
    uuid_str,
)
from .errors import CloseCode, ErrorCode, HoomiError, ProtocolError, Reconnect
from .frames import (
    Ack,
    ClientFrame,
    Delete,
    Deleted,
    Edit,
    EditAck,
    Edited,
    Error,
    Hello,
    History,
    HoomiState,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    Presence,
    PresenceReply,
    Read,
    ReadAck,
    Receipt,
    Reencrypt,
    ReencryptAck,
    ReencryptItem,
    Ref,
    Search,
    Send,
    ServerFrame,
    Sync,
    Typing,
    TypingNotice,
    Welcome,
)
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "Ack", "ClientFrame", "CloseCode", "DEFAULT_LIMITS", "Delete", "Deleted", "Edit",
    "EditAck", "Edited", "Error",
    "ErrorCode", "Hello", "History", "HoomiError", "HoomiState", "Limits", "Membership",
    "MessageBody", "Page", "Ping", "Pong", "ProtocolError", "Reconnect", "Reencrypt",
    "ReencryptAck", "ReencryptItem", "Ref", "Search", "Send",
    "ServerFrame", "Sync", "Welcome", "client_frame", "decode_client",
    "Presence", "PresenceReply", "Read", "ReadAck", "Receipt", "Typing", "TypingNotice",
    "decode_server", "encode_client",
    "encode_server", "decode_server_stream", "split_stream", "encode_body_map",
    "encode_body_maps", "uuid_str",
]
