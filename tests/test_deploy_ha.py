"""The highly available layout, deploy/ha/compose.yaml, checked without Docker: three
Patroni nodes on a three-member etcd with synchronous replication and pg_rewind, a Valkey
Cluster, two hubs whose DATABASE_URL names every PostgreSQL node for the primary, nginx
in front. Patroni's own validator reads the node config; the failover it describes is
run for real by tests/test_failover.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sysconfig
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from server.testing.replica import ROOT
from storage.db import _single_host_dsns

HA = ROOT / "deploy" / "ha"
README = (ROOT / "README.md").read_text()
DOCUMENTED = set(re.findall(r"^\| `([A-Z_]+)` \|", README, re.M))
PATRONI_NODES = ("pg1", "pg2", "pg3")
ETCD = ("etcd1", "etcd2", "etcd3")
VALKEY = tuple(f"valkey{n}" for n in range(1, 7))
HUBS = ("hub1", "hub2")


def interpolated(value: str) -> str:
    """What compose makes of `${VAR:?message}` once VAR is set."""
    return re.sub(r"\$\{(\w+):\?[^}]*\}", "secret", value)


def compose() -> dict:
    return yaml.safe_load((HA / "compose.yaml").read_text())


def patroni_config() -> dict:
    return yaml.safe_load((HA / "patroni" / "patroni.yml").read_text())


def test_every_service_of_the_layout_with_health_checks():
    services = compose()["services"]
    assert set(services) == {*ETCD, *PATRONI_NODES, *VALKEY, "valkey-cluster-init", *HUBS,
                             "lb"}
    for name, svc in services.items():
        if name != "valkey-cluster-init":  # a one-shot job: it exits when done
            assert "healthcheck" in svc, name
    assert set(compose()["volumes"]) == {*ETCD, *PATRONI_NODES}
    assert services["lb"]["ports"] == ["8000:8000", "127.0.0.1:8001:8001"]


def test_three_patroni_nodes_on_a_three_member_etcd():
    services = compose()["services"]
    names, addresses = set(), set()
    for node in PATRONI_NODES:
        env = services[node]["environment"]
        names.add(env["PATRONI_NAME"])
        addresses.add(env["PATRONI_POSTGRESQL_CONNECT_ADDRESS"])
        assert env["PATRONI_SCOPE"] == "hoomi"
        assert env["PATRONI_ETCD3_HOSTS"].split(",") == [f"{e}:2379" for e in ETCD]
        assert f"{node}:/var/lib/postgresql/data" in services[node]["volumes"]
        for key, value in env.items():
            if key.endswith("PASSWORD"):
                assert value.startswith(f"${{{key}:?"), key  # from the operator, not the file
    assert names == set(PATRONI_NODES)
    assert addresses == {f"{n}:5432" for n in PATRONI_NODES}
    members = {f"{e}=http://{e}:2380" for e in ETCD}
    for e in ETCD:
        args = services[e]["command"]
        assert f"--name={e}" in args
        (cluster,) = [a for a in args if a.startswith("--initial-cluster=")]
        assert set(cluster.split("=", 1)[1].split(",")) == members


def test_patroni_replicates_synchronously_and_rewinds():
    config = patroni_config()
    dcs = config["bootstrap"]["dcs"]
    # An ack means the message is on two servers, and only that standby is promoted.
    assert dcs["synchronous_mode"] is True
    assert dcs["synchronous_node_count"] == 1
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert dcs["postgresql"]["parameters"]["synchronous_commit"] == "on"
    assert dcs["postgresql"]["parameters"]["wal_log_hints"] == "on"  # pg_rewind needs it
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] <= dcs["ttl"]
    dockerfile = (HA / "patroni" / "Dockerfile").read_text()
    assert "COPY patroni.yml /etc/patroni.yml" in dockerfile
    assert config["bootstrap"]["post_bootstrap"] in dockerfile
    script = HA / "patroni" / "post_bootstrap.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert "CREATE DATABASE hoomi OWNER hoomi" in script.read_text()


def test_patroni_accepts_the_node_config(tmp_path: Path):
    """`patroni --validate-config` on pg1's config as compose gives it, but with this
    machine's PostgreSQL binaries and an address that answers in place of etcd (the
    validator checks that both exist)."""
    patroni = Path(sysconfig.get_path("scripts")) / "patroni"
    if not patroni.exists():
        pytest.skip("no patroni: pip install 'patroni[etcd3]' (test extras)")
    from server.testing.patroni import pg_bin

    config = patroni_config()
    config["postgresql"]["bin_dir"] = str(pg_bin())
    path = tmp_path / "patroni.yml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATRONI_")}
    for key, value in compose()["services"]["pg1"]["environment"].items():
        env[key] = interpolated(str(value))
    with socket.socket() as etcd:
        etcd.bind(("127.0.0.1", 0))
        etcd.listen(1)
        env["PATRONI_ETCD3_HOSTS"] = f"127.0.0.1:{etcd.getsockname()[1]}"
        done = subprocess.run([str(patroni), "--validate-config", str(path)], env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hubs_use_every_node_for_the_primary_and_the_valkey_cluster():
    services = compose()["services"]
    for name in HUBS:
        env = services[name]["environment"]
        assert set(env) <= DOCUMENTED, set(env) - DOCUMENTED
        assert "${HOOMI_DB_PASSWORD:?" in env["DATABASE_URL"]
        url = interpolated(env["DATABASE_URL"])
        parts = urlsplit(url)
        assert parts.netloc.rpartition("@")[2].split(",") == [
            f"{n}:5432" for n in PATRONI_NODES]
        assert parse_qs(parts.query)["target_session_attrs"] == ["read-write"]
        # The hub reads it as three hosts, tried at once, and follows the primary.
        assert len(_single_host_dsns(url)) == 3
        assert env["HOOMI_JWT_SECRET"].startswith("${HOOMI_JWT_SECRET:?")
        assert env["HOOMI_REDIS_MODE"] == "cluster"
        assert urlsplit(env["REDIS_URL"]).hostname in VALKEY
        assert set(PATRONI_NODES) <= set(services[name]["depends_on"])


def test_valkey_runs_as_a_cluster_of_three_shards_with_replicas():
    services = compose()["services"]
    for name in VALKEY:
        args = services[name]["command"]
        assert args[args.index("--cluster-enabled") + 1] == "yes"
        assert args[args.index("--cluster-announce-hostname") + 1] == name
    init = services["valkey-cluster-init"]
    assert set(init["depends_on"]) == set(VALKEY)
    script = " ".join(init["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert "for n in 1 2 3 4 5 6" in script


def test_load_balancer_sends_to_every_hub():
    (volume,) = compose()["services"]["lb"]["volumes"]
    source = (HA / volume.split(":")[0]).resolve()
    assert source == ROOT / "deploy" / "nginx.conf"
    conf = source.read_text()
    for hub in HUBS:
        assert f"server {hub}:8000" in conf
