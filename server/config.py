"""Settings: read once from the environment into one frozen object, passed down.

Every variable is listed in the README's configuration table. In embedded mode (no
DATABASE_URL) the JWT secret and admin token, unless set, are generated once and kept
in `<HOOMI_DATA_DIR>/secrets.json` (mode 0600) so tokens survive restarts.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "hoomi"


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    # A streaming standby for history, sync and search pages (docs/scaling.md).
    read_database_url: str | None = None
    redis_url: str | None = None
    redis_mode: str = "standalone"  # or "cluster": sharded pub/sub on a Redis/Valkey Cluster
    jwt_secret: str = ""
    admin_token: str = ""
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".")
    max_content_bytes: int = 65536
    batch_max_size: int = 256
    batch_max_delay_ms: float = 1.0
    db_pool_size: int = 10
    send_queue_frames: int = 1024
    send_queue_mb: float = 16.0
    max_inflight_sends: int = 256
    hello_timeout_s: float = 10.0
    reconcile_interval_s: float = 2.0
    presence_ttl_s: float = 30.0  # a killed replica's users stay online in `presence` this long
    gap_grace_ms: float = 30.0
    purge_interval_s: float = 60.0
    db_wait_s: float = 30.0
    writer_queue_mb: float = 64.0
    max_connections: int = 20_000
    max_sockets_per_user: int = 32
    send_rate: float = 200.0  # sends per second per connection, sustained
    send_burst: int = 400
    request_rate: float = 50.0  # history, sync and delete per second per connection
    request_burst: int = 100
    log_level: str = "info"
    log_format: str = "text"
    cors_origins: tuple[str, ...] = ()
    # -- abuse bounds (issue 14) --
    close_timeout_s: float = 5.0  # a close not written and answered in this is aborted
    header_timeout_s: float = 10.0  # a new TCP connection must send its request headers
    body_timeout_s: float = 15.0  # a request body must arrive in full
    idle_timeout_s: float = 5.0  # keep-alive: idle HTTP connection between requests
    response_timeout_s: float = 30.0  # an unread HTTP response is aborted after this
    max_http_connections: int = 1024  # TCP connections not (yet) upgraded, per replica
    max_unauthenticated: int = 0  # sockets before welcome; 0: a tenth of max_connections
    max_unauthenticated_per_address: int = 16
    hello_rate: float = 20.0  # hellos per second per client address, sustained
    hello_burst: int = 100
    auth_failure_rate: float = 1.0  # failed authentications per second per address
    auth_failure_burst: int = 20
    http_rate: float = 50.0  # HTTP API requests per second per user token, sustained
    http_burst: int = 100
    http_max_inflight: int = 64  # HTTP API requests being served at once, per replica
    user_max_reads: int = 4  # database reads (pages, sync) one user runs at once
    page_max_bytes: int = 1 << 20  # ciphertext bytes in one history/sync page
    metrics_token: str | None = None  # when set, /metrics needs `Bearer <token>`
    erase_interval_s: float = 60.0  # deleted and purged rows vacuumed off disk this often
    erase_rewrite_s: float = 86400.0  # a partition with erasures rewritten at most this often
    trusted_proxies: str = "127.0.0.1"  # whose X-Forwarded-For names the client
    message_partitions: int = 16  # hash partitions of `messages`, fixed at install
    archive_url: str | None = None  # file:///dir or s3://bucket/prefix: old content goes there
    archive_after_s: float | None = None  # messages older than this are archived; None: never
    archive_interval_s: float = 600.0  # how often a replica runs the archive pass
    archive_cache_mb: float = 64.0  # parsed segments kept in memory for reads, per replica
    backup_url: str | None = None  # file:///dir or s3://bucket/prefix: scheduled backups
    backup_interval_s: float = 86400.0
    backup_keep: int = 7

    @property
    def unauthenticated_budget(self) -> int:
        """Sockets allowed to wait for `hello` at once on one replica."""
        if self.max_unauthenticated:
            return min(self.max_unauthenticated, self.max_connections)
        return max(1, self.max_connections // 10)

    @property
    def embedded(self) -> bool:
        return self.database_url is None


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, default: N, lo: N, hi: N) -> N:
    """The variable parsed as the type of its default, within [lo, hi]."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def _origins(raw: str) -> tuple[str, ...]:
    """Comma-separated browser origins (scheme://host[:port]) allowed to call the HTTP API."""
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for o in origins:
        if o != "*" and not o.startswith(("http://", "https://")):
            raise ConfigError(f"HOOMI_CORS_ORIGINS: {o!r} is not an origin like "
                              "https://chat.example.org")
    return origins


def _backup_url(raw: str) -> str | None:
    if not raw:
        return None
    if not (raw.startswith("s3://") and len(raw) > 5 or raw.startswith("file:///")):
        raise ConfigError(f"HOOMI_BACKUP_URL: {raw!r} is not file:///dir or s3://bucket/prefix")
    return raw


def _archive_url(raw: str) -> str | None:
    if not raw:
        return None
    if not (raw.startswith("s3://") and len(raw) > 5 or raw.startswith("file:///")):
        raise ConfigError(f"HOOMI_ARCHIVE_URL: {raw!r} is not file:///dir or s3://bucket/prefix")
    return raw


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment (os.environ by default)."""
    env = os.environ if env is None else env
    data_dir = Path(env.get("HOOMI_DATA_DIR") or default_data_dir()).expanduser()
    settings = Settings(
        database_url=env.get("DATABASE_URL") or None,
        read_database_url=env.get("HOOMI_READ_DATABASE_URL") or None,
        redis_url=env.get("REDIS_URL") or None,
        redis_mode=(env.get("HOOMI_REDIS_MODE") or "standalone").strip().lower(),
        jwt_secret=env.get("HOOMI_JWT_SECRET", ""),
        admin_token=env.get("HOOMI_ADMIN_TOKEN", ""),
        jwt_issuer=env.get("HOOMI_JWT_ISSUER") or None,
        jwt_audience=env.get("HOOMI_JWT_AUDIENCE") or None,
        host=env.get("HOOMI_HOST") or "127.0.0.1",
        port=_number(env, "HOOMI_PORT", 8000, 0, 65535),
        data_dir=data_dir,
        max_content_bytes=_number(env, "HOOMI_MAX_CONTENT_BYTES", 65536, 16, 16 * 1024 * 1024),
        batch_max_size=_number(env, "HOOMI_BATCH_MAX_SIZE", 256, 1, 10000),
        batch_max_delay_ms=_number(env, "HOOMI_BATCH_MAX_DELAY_MS", 1.0, 0.0, 1000.0),
        db_pool_size=_number(env, "HOOMI_DB_POOL_SIZE", 10, 2, 1000),
        send_queue_frames=_number(env, "HOOMI_SEND_QUEUE_FRAMES", 1024, 8, 1_000_000),
        send_queue_mb=_number(env, "HOOMI_SEND_QUEUE_MB", 16.0, 0.0625, 65536.0),
        max_inflight_sends=_number(env, "HOOMI_MAX_INFLIGHT_SENDS", 256, 1, 100_000),
        hello_timeout_s=_number(env, "HOOMI_HELLO_TIMEOUT_S", 10.0, 0.1, 3600.0),
        reconcile_interval_s=_number(env, "HOOMI_RECONCILE_INTERVAL_S", 2.0, 0.05, 3600.0),
        presence_ttl_s=_number(env, "HOOMI_PRESENCE_TTL_S", 30.0, 0.3, 3600.0),
        gap_grace_ms=_number(env, "HOOMI_GAP_GRACE_MS", 30.0, 0.0, 10_000.0),
        purge_interval_s=_number(env, "HOOMI_PURGE_INTERVAL_S", 60.0, 1.0, 86400.0),
        db_wait_s=_number(env, "HOOMI_DB_WAIT_S", 30.0, 0.0, 3600.0),
        writer_queue_mb=_number(env, "HOOMI_WRITER_QUEUE_MB", 64.0, 1.0, 65536.0),
        max_connections=_number(env, "HOOMI_MAX_CONNECTIONS", 20_000, 1, 10_000_000),
        max_sockets_per_user=_number(env, "HOOMI_MAX_SOCKETS_PER_USER", 32, 1, 100_000),
        send_rate=_number(env, "HOOMI_SEND_RATE", 200.0, 0.1, 1_000_000.0),
        send_burst=_number(env, "HOOMI_SEND_BURST", 400, 1, 1_000_000),
        request_rate=_number(env, "HOOMI_REQUEST_RATE", 50.0, 0.1, 1_000_000.0),
        request_burst=_number(env, "HOOMI_REQUEST_BURST", 100, 1, 1_000_000),
        log_level=(env.get("HOOMI_LOG_LEVEL") or "info").lower(),
        log_format=(env.get("HOOMI_LOG_FORMAT") or "text").lower(),
        cors_origins=_origins(env.get("HOOMI_CORS_ORIGINS") or ""),
        close_timeout_s=_number(env, "HOOMI_CLOSE_TIMEOUT_S", 5.0, 0.1, 300.0),
        header_timeout_s=_number(env, "HOOMI_HEADER_TIMEOUT_S", 10.0, 0.1, 300.0),
        body_timeout_s=_number(env, "HOOMI_BODY_TIMEOUT_S", 15.0, 0.1, 3600.0),
        idle_timeout_s=_number(env, "HOOMI_IDLE_TIMEOUT_S", 5.0, 0.1, 3600.0),
        response_timeout_s=_number(env, "HOOMI_RESPONSE_TIMEOUT_S", 30.0, 0.1, 3600.0),
        max_http_connections=_number(env, "HOOMI_MAX_HTTP_CONNECTIONS", 1024, 1, 10_000_000),
        max_unauthenticated=_number(env, "HOOMI_MAX_UNAUTHENTICATED", 0, 0, 10_000_000),
        max_unauthenticated_per_address=_number(
            env, "HOOMI_MAX_UNAUTHENTICATED_PER_ADDRESS", 16, 1, 10_000_000),
        hello_rate=_number(env, "HOOMI_HELLO_RATE", 20.0, 0.01, 1_000_000.0),
        hello_burst=_number(env, "HOOMI_HELLO_BURST", 100, 1, 1_000_000),
        auth_failure_rate=_number(env, "HOOMI_AUTH_FAILURE_RATE", 1.0, 0.01, 1_000_000.0),
        auth_failure_burst=_number(env, "HOOMI_AUTH_FAILURE_BURST", 20, 1, 1_000_000),
        http_rate=_number(env, "HOOMI_HTTP_RATE", 50.0, 0.1, 1_000_000.0),
        http_burst=_number(env, "HOOMI_HTTP_BURST", 100, 1, 1_000_000),
        http_max_inflight=_number(env, "HOOMI_HTTP_MAX_INFLIGHT", 64, 1, 1_000_000),
        user_max_reads=_number(env, "HOOMI_USER_MAX_READS", 4, 1, 10_000),
        page_max_bytes=_number(env, "HOOMI_PAGE_MAX_BYTES", 1 << 20, 1024, 1 << 30),
        metrics_token=env.get("HOOMI_METRICS_TOKEN") or None,
        erase_interval_s=_number(env, "HOOMI_ERASE_INTERVAL_S", 60.0, 1.0, 86400.0),
        erase_rewrite_s=_number(env, "HOOMI_ERASE_REWRITE_S", 86400.0, 0.0, 365 * 86400.0),
        trusted_proxies=(env.get("HOOMI_TRUSTED_PROXIES") or "127.0.0.1").strip(),
        message_partitions=_number(env, "HOOMI_MESSAGE_PARTITIONS", 16, 1, 1024),
        archive_url=_archive_url(env.get("HOOMI_ARCHIVE_URL") or ""),
        archive_after_s=(_number(env, "HOOMI_ARCHIVE_AFTER_S", 0.0, 0.0, 3153600000.0)
                         if env.get("HOOMI_ARCHIVE_AFTER_S") else None),
        archive_interval_s=_number(env, "HOOMI_ARCHIVE_INTERVAL_S", 600.0, 1.0, 31 * 86400.0),
        archive_cache_mb=_number(env, "HOOMI_ARCHIVE_CACHE_MB", 64.0, 0.0, 1 << 20),
        backup_url=_backup_url(env.get("HOOMI_BACKUP_URL") or ""),
        backup_interval_s=_number(env, "HOOMI_BACKUP_INTERVAL_S", 86400.0, 1.0, 31 * 86400.0),
        backup_keep=_number(env, "HOOMI_BACKUP_KEEP", 7, 1, 100_000),
    )
    if settings.redis_mode not in ("standalone", "cluster"):
        raise ConfigError("HOOMI_REDIS_MODE: standalone or cluster")
    if settings.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("HOOMI_LOG_LEVEL: one of debug, info, warning, error")
    if settings.log_format not in ("text", "json"):
        raise ConfigError("HOOMI_LOG_FORMAT: text or json")
    return with_secrets(settings)


def with_secrets(settings: Settings) -> Settings:
    """Fill missing secrets: generated and kept in the data dir in embedded mode only."""
    if settings.jwt_secret and settings.admin_token:
        return settings
    if not settings.embedded:
        missing = "HOOMI_JWT_SECRET" if not settings.jwt_secret else "HOOMI_ADMIN_TOKEN"
        raise ConfigError(f"{missing}: required when DATABASE_URL is set")
    stored = _dev_secrets(settings.data_dir)
    return replace(
        settings,
        jwt_secret=settings.jwt_secret or stored["jwt_secret"],
        admin_token=settings.admin_token or stored["admin_token"],
    )


def _dev_secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "secrets.json"
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    data_dir.mkdir(parents=True, exist_ok=True)
    fresh = {"jwt_secret": secrets.token_urlsafe(48), "admin_token": secrets.token_urlsafe(32)}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another replica wrote it first
        loaded = json.loads(path.read_text())
        return loaded
    with os.fdopen(fd, "w") as f:
        json.dump(fresh, f)
    return fresh
