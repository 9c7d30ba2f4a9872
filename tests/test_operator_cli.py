"""`hoomi audit`, `hoomi hoomi show`, `hoomi user show` against a running hub: readable
text for a person, the API's JSON with --json, one-line errors."""

from __future__ import annotations

import json
import re
from uuid import uuid4

import pytest

from server.testing.replica import ADMIN_TOKEN
from tests.newcomer import cli, newcomer_env


@pytest.fixture(scope="module")
def cluster(process_cluster):
    """`hoomi` commands run with subprocess.run, which blocks this event loop: the hub
    they talk to must be another process."""
    return process_cluster


async def test_operator_reads_from_the_cli(cluster, tmp_path):
    env = newcomer_env(tmp_path, HOOMI_URL=cluster.a.http, HOOMI_ADMIN_TOKEN=ADMIN_TOKEN,
                       DATABASE_URL=cluster.dsn)
    alice = cli("user", "create", env=env, cwd=tmp_path).stdout.strip()
    bob = cli("user", "create", env=env, cwd=tmp_path).stdout.strip()
    h = cli("hoomi", "create", "--admin", alice, "--member", bob, env=env,
            cwd=tmp_path).stdout.strip()
    assert cli("member", "remove", h, bob, env=env, cwd=tmp_path).returncode == 0

    shown = cli("hoomi", "show", h, env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"Hoomi {h}\n")
    assert re.search(rf"^\s+admin\s+{alice}$", shown.stdout, re.M)
    assert bob not in shown.stdout and "retention       forever" in shown.stdout
    as_json = json.loads(cli("hoomi", "show", h, "--json", env=env, cwd=tmp_path).stdout)
    assert as_json["members"] == [{"user_id": alice, "role": "admin"}]
    assert as_json["last_seq"] == 0 and as_json["messages"] == 0

    user = cli("user", "show", alice, env=env, cwd=tmp_path)
    assert user.returncode == 0 and re.search(rf"admin\s+{h}", user.stdout), user.stdout
    assert json.loads(cli("user", "show", bob, "--json", env=env, cwd=tmp_path).stdout) == {
        "id": bob, "hoomis": []}

    audit = cli("audit", "--hoomi", h, env=env, cwd=tmp_path)
    assert audit.returncode == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert "member.remove" in lines[0] and f"target_id={bob}" in lines[0]
    assert "hoomi.create" in lines[-1] and "by operator" in lines[-1]
    page = json.loads(cli("audit", "--hoomi", h, "--limit", "1", "--json", env=env,
                          cwd=tmp_path).stdout)
    assert [e["action"] for e in page["entries"]] == ["member.remove"]
    older = cli("audit", "--hoomi", h, "--before", str(page["next_before"]),
                "--action", "hoomi.create", env=env, cwd=tmp_path)
    assert len(older.stdout.splitlines()) == 1 and "hoomi.create" in older.stdout

    missing = cli("hoomi", "show", str(uuid4()), env=env, cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr == "hoomi: 404 not_found: id: no such hoomi\n"
    bad = cli("audit", "--hoomi", "nope", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("hoomi: not a UUID")
    assert cli("user", "show", env=env, cwd=tmp_path).stderr == "hoomi: user show needs an id\n"
