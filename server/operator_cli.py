"""`hoomi audit`, `hoomi hoomi show`, `hoomi user show`: the operator read API for a person
(aligned text) or a program (`--json`, the API's own body). They reach the running hub the
way every management command does (`cli._api`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

Api = Callable[..., Any]


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "forever"
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit} ({seconds} s)"
    return f"{seconds} s"


def format_hoomi(view: dict[str, Any]) -> str:
    members = view["members"]
    lines = [
        f"Hoomi {view['id']}",
        f"  last seq        {view['last_seq']}",
        f"  messages        {view['messages']} stored (tombstones included)",
        f"  retention       {_duration(view['retention_seconds'])}",
        f"  archived up to  {view['archived_upto'] if view['archived_upto'] else '-'}",
        f"  members ({len(members)})",
    ]
    lines += [f"    {m['role']:<7} {m['user_id']}" for m in members]
    return "\n".join(lines)


def format_user(view: dict[str, Any]) -> str:
    hoomis = view["hoomis"]
    lines = [f"User {view['id']}", f"  hoomis ({len(hoomis)})"]
    lines += [f"    {h['role']:<7} {h['hoomi_id']}  last seq {h.get('last_seq', '?')}"
              for h in hoomis]
    return "\n".join(lines)


def format_audit(page: dict[str, Any]) -> str:
    entries = page["entries"]
    if not entries:
        return "no audit entries"
    lines = []
    for e in entries:
        actor = e["actor_kind"] + (f" {e['actor_id']}" if e["actor_id"] else "")
        where = " ".join(f"{k}={e[k]}" for k in ("hoomi_id", "target_id") if e[k])
        details = json.dumps(e["details"], separators=(",", ":")) if e["details"] else ""
        lines.append(f"#{e['id']:<6} {_when(e['at'])}  {e['action']:<16} by {actor}"
                     + (f"  {where}" if where else "") + (f"  {details}" if details else ""))
    if page["next_before"] is not None:
        lines.append(f"(older entries: --before {page['next_before']})")
    return "\n".join(lines)


def show_hoomi(api: Api, hoomi_id: str, as_json: bool) -> str:
    view = api("GET", f"/v1/admin/hoomis/{hoomi_id}")
    return json.dumps(view, indent=2) if as_json else format_hoomi(view)


def show_user(api: Api, user_id: str, as_json: bool) -> str:
    view = api("GET", f"/v1/admin/users/{user_id}")
    return json.dumps(view, indent=2) if as_json else format_user(view)


def cmd_audit(api: Api, args: argparse.Namespace) -> str:
    query = {k: v for k, v in (("hoomi_id", args.hoomi), ("actor_id", args.actor),
                               ("action", args.action), ("before", args.before),
                               ("limit", args.limit)) if v is not None}
    page = api("GET", "/v1/admin/audit" + (f"?{urlencode(query)}" if query else ""))
    return json.dumps(page, indent=2) if args.json else format_audit(page)


def add_audit_parser(sub: Any) -> argparse.ArgumentParser:
    a: argparse.ArgumentParser = sub.add_parser(
        "audit", help="read the audit log, newest first (via the running hub)")
    a.add_argument("--hoomi", metavar="HOOMI_ID", help="only this Hoomi's entries")
    a.add_argument("--actor", metavar="USER_ID", help="only what this user did")
    a.add_argument("--action", help="only this action, e.g. message.delete")
    a.add_argument("--before", type=int, metavar="ID", help="entries older than this id")
    a.add_argument("--limit", type=int, default=50, help="entries per page (1-1000)")
    a.add_argument("--json", action="store_true", help="the API's JSON body")
    return a
