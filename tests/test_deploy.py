"""What can be checked of the deployment without Docker: the compose file names every
service and the variables the README documents, nginx accepts its own config, and the
Dockerfile runs the hub as a non-root user."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster import ROOT

README = (ROOT / "README.md").read_text()
DOCUMENTED = set(re.findall(r"^\| `([A-Z_]+)` \|", README, re.M))


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_names_every_service_with_health_checks():
    services = compose()["services"]
    assert set(services) == {"postgres", "valkey", "hub1", "hub2", "lb"}
    for name, svc in services.items():
        assert "healthcheck" in svc, name
    assert services["lb"]["ports"] == ["8000:8000"]
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
