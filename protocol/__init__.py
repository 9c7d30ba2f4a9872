"""Protocol v1 of the Hoomi hub: frames, codec, limits and error codes. Pure: no I/O."""

from .codec import decode_client, decode_server, encode_client, encode_server
from .errors import CloseCode, ErrorCode, ProtocolError
from .frames import (
    Ack,
    ClientFrame,
    Delete,
    Deleted,
    Error,
    Hello,
    History,
    HoomiState,
    Membership,
    MessageBody,
    Page,
    Ping,
    Pong,
    Send,
    ServerFrame,
    Sync,
    Welcome,
)
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "Ack", "ClientFrame", "CloseCode", "DEFAULT_LIMITS", "Delete", "Deleted", "Error",
    "ErrorCode", "Hello", "History", "HoomiState", "Limits", "Membership", "MessageBody",
    "Page", "Ping", "Pong", "ProtocolError", "Send", "ServerFrame", "Sync", "Welcome",
    "decode_client", "decode_server", "encode_client", "encode_server",
]
