"""What can be checked of the deployment without Docker: the compose file names every
service and the variables the README documents, nginx accepts its own config and, run
for real in front of two replicas, does what it says; the Dockerfile runs the hub as a
non-root user."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from server.testing.loopback import free_port, until_ok
from server.testing.replica import ADMIN_TOKEN, ROOT, Replica
from tests.wsclient import Admin, Peer, joined, messages, send

README = (ROOT / "README.md").read_text()
DOCUMENTED = set(re.findall(r"^\| `([A-Z_]+)` \|", README, re.M))


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_names_every_service_with_health_checks():
    services = compose()["services"]
    started = {name for name, svc in services.items() if "profiles" not in svc}
    assert started == {"postgres", "valkey", "hub1", "hub2", "lb", "prometheus", "grafana"}
    # Started only on request (`--profile citus`, docs/scaling.md).
    assert set(services) - started == {"citus-coordinator", "citus-worker1", "citus-worker2"}
    for name, svc in services.items():
        assert "healthcheck" in svc, name
    # The public port, and the operator API's listener on the host's loopback only.
    assert services["lb"]["ports"] == ["8000:8000", "127.0.0.1:8001:8001"]
    assert "pgdata" in compose()["volumes"]


def test_hubs_set_only_documented_variables_and_all_required_ones():
    for name in ("hub1", "hub2"):
        env = compose()["services"][name]["environment"]
        assert {"DATABASE_URL", "REDIS_URL", "HOOMI_JWT_SECRET", "HOOMI_ADMIN_TOKEN"} <= set(env)
        assert set(env) <= DOCUMENTED, set(env) - DOCUMENTED
        assert env["REDIS_URL"].startswith("redis://valkey:")
        assert "@postgres:5432/" in env["DATABASE_URL"]
        # Secrets come from the operator's environment, never from the file.
        assert env["HOOMI_JWT_SECRET"].startswith("${HOOMI_JWT_SECRET:?")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def test_nginx_accepts_the_load_balancer_config(tmp_path: Path):
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx-light)")
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    # The compose service names do not resolve here; the config is otherwise as shipped.
    conf = conf.replace("hub1:8000", "127.0.0.1:18001").replace("hub2:8000", "127.0.0.1:18002")
    conf = conf.replace("listen 8000;", "listen 127.0.0.1:18000;")
    conf = conf.replace("listen 8001;", "listen 127.0.0.1:18003;")
    path = tmp_path / "nginx.conf"
    path.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n" + conf)
    out = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr
    assert "proxy_set_header Upgrade $http_upgrade;" in conf


def test_dockerfile_runs_the_hub_unprivileged():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    directives = {ln.split()[0] for ln in lines if ln and not ln.startswith("#")
                  and ln.split()[0].isupper()}
    assert {"FROM", "USER", "EXPOSE", "HEALTHCHECK", "CMD"} <= directives
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 8000" in lines
    assert lines[-1] == 'CMD ["hoomi", "serve"]'


async def operator_api_is_internal_only(public: str, internal: str, admin: Admin) -> None:
    """POST /v1/admin/tokens (and every /v1/admin path, however spelled) is a JSON 404 on
    the public port, with the right operator token, and works on the internal one."""
    user = await admin.user()
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    body = {"user_id": str(user), "ttl_seconds": 60}
    async with httpx.AsyncClient(base_url=public, headers=auth) as http:
        for method, path in [("POST", "/v1/admin/tokens"), ("POST", "/v1/admin/users"),
                             ("GET", f"/v1/admin/users/{user}"), ("POST", "/v1/%61dmin/tokens"),
                             ("POST", "//v1/admin/tokens"), ("POST", "/v1/admin/../admin/tokens"),
                             ("GET", "/v1/admin")]:
            r = await http.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.status_code)
            assert r.json() == {"error": "not_found", "message": "path: no such route",
                                "field": "path"}, path
    async with httpx.AsyncClient(base_url=internal, headers=auth) as http:
        r = await http.post("/v1/admin/tokens", json=body)
        assert r.status_code == 200, r.text
        minted = r.json()["token"]
        assert (await http.get("/metrics")).status_code == 404
    async with httpx.AsyncClient(base_url=public) as http:  # the minted token works publicly
        r = await http.get("/v1/hoomis", headers={"Authorization": f"Bearer {minted}"})
        assert r.status_code == 200, r.text


@pytest.mark.timeout(90)
async def test_nginx_in_front_of_two_replicas(tmp_path: Path, dsn, valkey):
    """The shipped config, run for real in front of two replicas: WebSockets pass, a full
    replica's 503 is retried on the other one, /metrics stays private, and the operator
    API answers only on the internal listener."""
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx-light)")
    full = Replica(dsn, valkey.url, name="lb-full", HOOMI_MAX_CONNECTIONS="1").start()
    roomy = Replica(dsn, valkey.url, name="lb-roomy").start()
    port, internal = free_port(), free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("hub1:8000", f"127.0.0.1:{full.port}")
    conf = conf.replace("hub2:8000", f"127.0.0.1:{roomy.port}")
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("listen 8001;", f"listen 127.0.0.1:{internal};")
    conf = conf.replace("worker_processes auto;", "worker_processes 1;")
    head = f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
    if os.geteuid() == 0:
        head += "user root;\n"  # workers may write their temp files under tmp_path
    (tmp_path / "nginx.conf").write_text(head + conf)
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-g", "daemon off;"], stderr=subprocess.PIPE)
    admin = Admin(roomy.http)
    peers: list[Peer] = []
    try:
        base = f"http://127.0.0.1:{port}"
        await until_ok(base + "/healthz", 10, lambda: f"nginx exit code {proc.poll()}")
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/metrics")).status_code == 404
            assert (await http.get("/readyz")).json()["ready"] is True
        await operator_api_is_internal_only(base, f"http://127.0.0.1:{internal}", admin)
        users = [await admin.user() for _ in range(4)]
        h = await admin.hoomi(users)
        # Four sockets through nginx: the full replica takes one and refuses the rest
        # with 503, which nginx retries on the other replica; no client sees an error.
        for u in users:
            peer, welcome = await joined(f"ws://127.0.0.1:{port}/v1/ws", await admin.token(u))
            assert [s.hoomi_id for s in welcome.hoomis] == [h]
            peers.append(peer)
        await peers[0].send(send(h, ref="via-lb"))
        for p in peers:
            (m,) = await messages(p, 1)
            assert m.seq == 1
        metrics = (await admin.http.get(full.http + "/metrics")).text
        assert 'hoomi_refused_upgrades_total{reason="replica full"}' in metrics
    finally:
        for p in peers:
            await p.close()
        await admin.close()
        proc.terminate()
        proc.communicate(timeout=10)  # waits, and closes its stderr pipe
        full.stop()
        roomy.stop()
