"""Where the running hub is: found the same way by every command, the server's `hoomi`
commands and the reference client's `hoomi-chat` alike.

HOOMI_URL if set, else http://HOOMI_HOST:HOOMI_PORT with the hub's defaults (a wildcard
listen address is dialled on loopback).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def hub_url(env: Mapping[str, str] | None = None) -> str:
    """The running hub's base URL, found the same way by every command (`hoomi chat`
    too): HOOMI_URL if set, else http://HOOMI_HOST:HOOMI_PORT with the hub's defaults
    (a wildcard listen address is dialled on loopback)."""
    env = os.environ if env is None else env
    url = (env.get("HOOMI_URL") or "").strip()
    if url:
        return url.rstrip("/")
    host = env.get("HOOMI_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    raw_port = env.get("HOOMI_PORT") or "8000"
    try:
        port = int(raw_port)
        if not 0 < port <= 65535:
            raise ValueError
    except ValueError:
        sys.exit(f"hoomi: HOOMI_PORT: not a port number: {raw_port!r}")
    return f"http://{host}:{port}"


def hub_ws_url(env: Mapping[str, str] | None = None) -> str:
    """The WebSocket URL of the hub `hub_url` finds."""
    base = hub_url(env)
    scheme, sep, rest = base.partition("://")
    if not sep:
        return f"ws://{base}/v1/ws"
    ws = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme)
    return f"{ws}://{rest}/v1/ws"
