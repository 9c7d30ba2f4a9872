"""The README's quick start, followed literally as a newcomer would: a fresh clone, `make
run` on a port of its own, the printed commands in a second terminal in another
directory, and two `hoomi chat` sessions in pseudo-terminals exchanging lines. Plus the
CLI's answers when something is off: no hub, the wrong data dir, an operator error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from hoomi_client.keys import generate_key_file
from server.testing.loopback import free_port, until_ok
from server.testing.replica import ADMIN_TOKEN, ROOT
from tests.newcomer import cli, newcomer_env
from tests.terminal import Terminal


@pytest.fixture(scope="module")
def cluster(process_cluster):
    """`hoomi` commands run with subprocess.run, which blocks this event loop: the hub
    they talk to must be another process."""
    return process_cluster

README = (ROOT / "README.md").read_text()


def shell_block(marker: str) -> str:
    """The ```sh block that follows `<!-- marker: ... -->` in the README."""
    after = README.split(f"<!-- {marker}:", 1)[1]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_quick_start_blocks_set_every_variable_they_use():
    blocks = shell_block("quickstart") + shell_block("quickstart-bob")
    used = set(re.findall(r"\$\{?([A-Z_]+)", blocks))
    set_here = set(re.findall(r"(?:export |^)([A-Z_]+)=", blocks, re.M))
    set_here |= set(re.findall(r"\b([A-Z_]+)=\$", blocks))
    assert used and used <= set_here, used - set_here


class Hub:
    """`make run` in a clone, in its own process group, stopped by SIGTERM to make."""

    def __init__(self, clone: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # make passes it on to the hub
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group
        except ProcessLookupError:
            pass
        return self.proc.wait(10)


def postmaster_alive(pgdata: Path) -> int | None:
    """The pid of a PostgreSQL still running on `pgdata`, if any."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None
    return pid


@pytest.mark.timeout(180)
async def test_quick_start_as_printed_on_another_port_from_another_directory(tmp_path: Path):
    clone = tmp_path / "hoomi-hub"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True,
                   timeout=60)
    # The newcomer's `make run` would build .venv; the suite's own is linked in instead,
    # and the pyproject.toml files its stamp is made from dated no later than the stamp, so
    # make sees it up to date and installs nothing (the test must not pip install).
    (clone / ".venv").symlink_to(ROOT / ".venv")
    stamp = (ROOT / ".venv" / ".installed").stat().st_mtime
    for made_from in ("pyproject.toml", "protocol/pyproject.toml", "client/pyproject.toml"):
        os.utime(clone / made_from, (stamp - 1, stamp - 1))  # the stamp's prerequisites
    assert subprocess.run(["make", "-q", "-C", str(clone), ".venv/.installed"],
                          timeout=30).returncode == 0, "make would rebuild .venv"

    port, data = free_port(), tmp_path / "hub-data"
    home = tmp_path / "home"
    home.mkdir()
    exported = {"HOOMI_PORT": str(port), "HOOMI_DATA_DIR": str(data)}  # in every terminal
    hub = Hub(clone, newcomer_env(home, **exported), tmp_path / "make-run.log")
    elsewhere = tmp_path / "elsewhere"  # the second and third terminals work here
    elsewhere.mkdir()
    activate = f". {clone}/.venv/bin/activate"  # "in this directory, . .venv/bin/activate"
    terminals: list[Terminal] = []
    try:
        await until_ok(f"http://127.0.0.1:{port}/healthz", 90, hub.output)
        assert str(data / "pgdata") in hub.output()  # it says where its data dir is
        env = newcomer_env(home, **exported)
        alice = Terminal(["bash", "--noprofile", "--norc", "-c",
                          f"{activate} && set -e\n{shell_block('quickstart')}"], env, elsewhere)
        terminals.append(alice)
        await alice.expect("start of history", timeout=60)
        assert (elsewhere / "keys.json").exists() and (elsewhere / "bob.env").exists()
        bob = Terminal(["bash", "--noprofile", "--norc", "-c",
                        f"{activate} && set -e\n{shell_block('quickstart-bob')}"], env,
                       elsewhere)
        terminals.append(bob)
        await bob.expect("start of history", timeout=60)
        alice.type("hello from the quick start")
        await bob.expect(": hello from the quick start")
        bob.type("/help")
        await bob.expect("/delete SEQ")
        bob.type("hi alice")
        screen = await alice.expect(": hi alice")
        assert ": /help" not in screen and "cannot decrypt" not in screen  # never sent
        assert not (elsewhere / "secrets.json").exists()
        assert sorted(p.name for p in (data).iterdir()) == ["pgdata", "secrets.json"]
    finally:
        for t in terminals:
            t.close()
        code = hub.stop()
    assert code is not None
    assert postmaster_alive(data / "pgdata") is None, "make run left PostgreSQL running"


def test_a_command_without_the_hubs_data_dir_says_where_it_looked(tmp_path: Path):
    empty = tmp_path / "not-the-hub"
    env = newcomer_env(tmp_path, HOOMI_DATA_DIR=str(empty), HOOMI_PORT=str(free_port()))
    for args in (["user", "create"], ["hoomi", "create"], ["token", str(uuid4())]):
        r = cli(*args, env=env, cwd=tmp_path)
        assert r.returncode == 1 and r.stdout == "", r
        assert str(empty / "secrets.json") in r.stderr and "HOOMI_DATA_DIR" in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # With no HOOMI_DATA_DIR it looks where the hub would, under the home directory.
    r = cli("user", "create", env=newcomer_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 1 and str(tmp_path / ".local/share/hoomi/secrets.json") in r.stderr
    assert not empty.exists() and not (tmp_path / ".local").exists()  # nothing created


async def test_cli_finds_the_hub_by_port_and_says_errors_in_one_line(cluster, tmp_path):
    env = newcomer_env(tmp_path, HOOMI_PORT=str(cluster.b.port), HOOMI_ADMIN_TOKEN=ADMIN_TOKEN,
                       DATABASE_URL=cluster.dsn)
    created = cli("user", "create", env=env, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    UUID(created.stdout.strip())  # just the id, for $(...)
    missing = cli("hoomi", "delete", str(uuid4()), env=env, cwd=tmp_path)
    assert missing.returncode == 1 and missing.stdout == ""
    assert re.fullmatch(r"hoomi: 404 not_found: [^{}\n]*hoomi[^{}\n]*\n", missing.stderr), (
        missing.stderr)  # one line, the code and the hub's message, no JSON
    refused = cli("user", "create", env={**env, "HOOMI_ADMIN_TOKEN": "not-the-token"},
                  cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.startswith("hoomi: 401 unauthorized")
    assert "HOOMI_ADMIN_TOKEN" in refused.stderr and refused.stderr.count("\n") == 1
    gone = cli("user", "create", env={**env, "HOOMI_PORT": str(free_port())}, cwd=tmp_path)
    assert gone.returncode == 1 and "cannot reach the hub at http://127.0.0.1:" in gone.stderr
    # hoomi chat looks in the same place, and says at once when nothing is there.
    h = uuid4()
    generate_key_file(tmp_path / "keys.json", [h])
    chat = cli("chat", "--hoomi", str(h), "--token", "t", "--key-file", "keys.json",
               env={**env, "HOOMI_PORT": str(free_port())}, cwd=tmp_path)
    assert chat.returncode == 1 and "cannot reach the hub at ws://127.0.0.1:" in chat.stderr
    # HOOMI_URL wins over HOOMI_HOST/HOOMI_PORT.
    via_url = cli("user", "create", env={**env, "HOOMI_PORT": "1", "HOOMI_URL": cluster.a.http},
                  cwd=tmp_path)
    assert via_url.returncode == 0, via_url.stderr


def test_version():
    r = subprocess.run([sys.executable, "-m", "server.cli", "--version"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and re.fullmatch(r"hoomi \d+\.\d+\.\d+\S*\n", r.stdout), r


def test_the_readme_documents_what_the_cli_does():
    assert "hoomi --version" in README and "hoomi: 404 not_found: id: no such hoomi" in README


def test_one_rule_finds_the_hub():
    from hoomi_client.locate import hub_url, hub_ws_url

    assert hub_url({}) == "http://127.0.0.1:8000"
    assert hub_url({"HOOMI_PORT": "8123"}) == "http://127.0.0.1:8123"
    assert hub_url({"HOOMI_HOST": "0.0.0.0", "HOOMI_PORT": "9"}) == "http://127.0.0.1:9"
    assert hub_url({"HOOMI_HOST": "::1"}) == "http://[::1]:8000"
    env = {"HOOMI_URL": "https://hub.example.org/", "HOOMI_PORT": "9"}
    assert hub_url(env) == "https://hub.example.org"
    assert hub_ws_url(env) == "wss://hub.example.org/v1/ws"
    assert hub_ws_url({"HOOMI_PORT": "8123"}) == "ws://127.0.0.1:8123/v1/ws"
    with pytest.raises(SystemExit, match="HOOMI_PORT"):
        hub_url({"HOOMI_PORT": "eighty"})
