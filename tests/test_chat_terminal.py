"""`hoomi chat` driven through pseudo-terminals, as two people would use it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from uuid import uuid4

from hoomi_client.crypto import decrypt
from hoomi_client.keys import (
    Keyring,
    add_hoomi_key,
    generate_key_file,
    key_from_passphrase,
    load_key_file,
    new_key,
)
from hoomi_client.sdk import HoomiClient
from server.testing.replica import ROOT
from tests.terminal import Terminal


async def test_two_people_chat_in_terminals(cluster, tmp_path):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    keyfile = tmp_path / "keys.json"
    generate_key_file(keyfile, [h])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    chat = [sys.executable, "-m", "server.cli", "chat", "--hoomi", str(h), "--key-file",
            str(keyfile)]
    a = Terminal(chat + ["--url", cluster.a.ws, "--token", a_tok], env)
    b = Terminal(chat + ["--url", cluster.b.ws, "--token", b_tok], env)
    try:
        await a.expect("start of history")
        await b.expect("start of history")
        a.type("hello bob, this is end-to-end encrypted")
        await b.expect("#1 " + str(alice)[:8] + ": hello bob, this is end-to-end encrypted")
        await a.expect("#1 me: hello bob")
        b.type("hi alice ✓")
        await a.expect("#2 " + str(bob)[:8] + ": hi alice ✓")
        b.type("/delete 2")
        await a.expect("#2 was deleted")
        b.type("/quit")
        assert await asyncio.to_thread(b.proc.wait, 10) == 0  # the hub runs in this loop
        for i in range(25):
            a.type(f"line {i}")
        await a.expect("#27 me: line 24")
        # A newcomer sees the last 20, then scrolls back with /more.
        c = Terminal(chat + ["--url", cluster.a.ws, "--token", b_tok], env)
        try:
            screen = await c.expect("#27 " + str(alice)[:8] + ": line 24")
            assert "#8 " in screen and "#7 " not in screen
            c.type("/more")
            screen = await c.expect("start of history")
            assert "#2 me: (deleted)" in screen  # bob again, on a second device
            assert "#1 " + str(alice)[:8] + ": hello bob" in screen
        finally:
            c.close()
    finally:
        a.close()
        b.close()


async def test_chat_with_a_wrong_key_says_it_cannot_decrypt(cluster, tmp_path):
    (alice, a_tok) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    right, wrong = tmp_path / "right.json", tmp_path / "wrong.json"
    generate_key_file(right, [h])
    generate_key_file(wrong, [h])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "server.cli", "chat", "--hoomi", str(h), "--url",
            cluster.a.ws, "--token", a_tok, "--key-file"]
    a = Terminal(base + [str(right)], env)
    try:
        await a.expect("start of history")
        a.type("secret")
        await a.expect("#1 me: secret")
    finally:
        a.close()
    w = Terminal(base + [str(wrong)], env)
    try:
        # Two key files made apart name their keys apart: the reader is told it lacks
        # the key, not that the message was tampered with.
        session = load_key_file(right).current(h).session_id
        screen = await w.expect(f"#1 me: (cannot decrypt: no key for this message's key id "
                                f"'{session}')")
        assert "tampered" not in screen
    finally:
        w.close()
    # A key under the same name but with other bytes: AES-GCM cannot tell that from
    # altered bytes, and the chat says both rather than alleging an attack.
    same_name = tmp_path / "same-name.json"
    add_hoomi_key(same_name, h, new_key(session))
    s = Terminal(base + [str(same_name)], env)
    try:
        await s.expect("#1 me: (cannot decrypt: wrong key or tampered)")
    finally:
        s.close()


async def test_chat_finds_the_hub_by_port_and_keeps_commands_off_the_wire(cluster, tmp_path):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    keyfile = tmp_path / "keys.json"
    generate_key_file(keyfile, [h])
    # No --url: the chat dials HOOMI_HOST:HOOMI_PORT, as every hoomi command does.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOOMI_PORT": str(cluster.a.port)}
    env.pop("HOOMI_URL", None)
    chat = [sys.executable, "-m", "server.cli", "chat", "--hoomi", str(h), "--key-file",
            str(keyfile)]
    a = Terminal(chat + ["--token", a_tok], env)
    b = Terminal(chat + ["--token", b_tok],
                 {**env, "HOOMI_URL": cluster.b.http, "HOOMI_PORT": "1"})
    try:
        await a.expect("start of history")
        await b.expect("start of history")
        a.type("/help")
        await a.expect("/delete SEQ")
        a.type("/hepl")
        await a.expect("not a command: /hepl; nothing was sent")
        a.type("//slash")
        await b.expect(str(alice)[:8] + ": /slash")
        a.type("first real line")
        screen = await b.expect(str(alice)[:8] + ": first real line")
        assert ": /help" not in screen and ": /hepl" not in screen  # never sent
        assert "#1 " in screen and "#2 " in screen and "#3 " not in screen
    finally:
        a.close()
        b.close()


async def test_passphrase_chat_uses_the_given_session_name(cluster):
    (alice, a_tok) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOOMI_PASS": "correct horse battery"}
    t = Terminal([sys.executable, "-m", "server.cli", "chat", "--hoomi", str(h), "--url",
                  cluster.a.ws, "--token", a_tok, "--passphrase-env", "HOOMI_PASS",
                  "--session", "pw2"], env)
    try:
        await t.expect("start of history")
        t.type("rotated")
        await t.expect("#1 me: rotated")
    finally:
        t.close()
    client = HoomiClient(cluster.a.ws, a_tok)
    await client.start()
    (page,) = [p async for p in client.scroll(h)]
    await client.close()
    ring = Keyring()
    ring.add(h, key_from_passphrase("correct horse battery", h, "pw2"))
    (m,) = page
    assert m.session_id == "pw2"
    assert decrypt(ring, h, alice, m.content, m.nonce, m.session_id).plaintext == b"rotated"


def test_keys_command_creates_then_rotates(tmp_path):
    h1, h2 = uuid4(), uuid4()
    path = tmp_path / "keys.json"

    def hoomi_keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.cli", "keys", str(path), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)

    assert hoomi_keys(str(h1), str(h2)).returncode == 0
    first = load_key_file(path)
    again = hoomi_keys(str(h1))
    assert again.returncode != 0 and "--rotate" in again.stderr
    rotated = hoomi_keys("--rotate", str(h1))
    assert rotated.returncode == 0, rotated.stderr
    ring = load_key_file(path)
    (only,) = ring.keys_of(h2)
    assert only.session_id.startswith("k1-") and len(only.session_id) == 11
    old, new = ring.keys_of(h1)
    assert old == first.current(h1) and ring.current(h1) == new != old
    assert new.session_id.startswith("k2-") and new.session_id in rotated.stdout
    assert (path.stat().st_mode & 0o777) == 0o600
    missing = subprocess.run([sys.executable, "-m", "server.cli", "keys", "--rotate",
                              str(tmp_path / "none.json"), str(h1)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "none.json" in missing.stderr


async def test_chat_says_so_and_ends_when_its_token_expires(cluster, tmp_path):
    import jwt

    from server.testing.replica import JWT_SECRET
    (alice, _) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    keyfile = tmp_path / "keys.json"
    generate_key_file(keyfile, [h])
    # Still inside the hub's 5 s leeway: joins, then expires 2 to 3 s later.
    token = jwt.encode({"sub": str(alice), "exp": int(time.time()) - 2}, JWT_SECRET,
                       algorithm="HS256")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = Terminal([sys.executable, "-m", "server.cli", "chat", "--hoomi", str(h), "--url",
                  cluster.a.ws, "--token", token, "--key-file", str(keyfile)], env)
    try:
        await t.expect("start of history")
        await t.expect("-- disconnected: ", timeout=15)
        assert "new token" in await t.expect("new token")
        deadline = time.monotonic() + 10
        while t.proc.poll() is None:  # it ends by itself, not waiting for a keystroke
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert t.proc.returncode == 1
    finally:
        t.close()


async def test_chat_edits_and_searches(cluster, tmp_path):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    keyfile = tmp_path / "keys.json"
    generate_key_file(keyfile, [h])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    chat = [sys.executable, "-m", "server.cli", "chat", "--hoomi", str(h), "--key-file",
            str(keyfile), "--scheme", "2"]
    a = Terminal(chat + ["--url", cluster.a.ws, "--token", a_tok], env)
    b = Terminal(chat + ["--url", cluster.b.ws, "--token", b_tok], env)
    try:
        await a.expect("start of history")
        await b.expect("start of history")
        a.type("Rendez-vous à l'École demain")
        a.type("the release is tomorrow")
        await b.expect("#2 " + str(alice)[:8] + ": the release is tomorrow")
        a.type("/edit 2 the release is on Friday")
        await b.expect("#2 " + str(alice)[:8] + " (edited): the release is on Friday")
        b.type("/search ecole RENDEZ")
        await b.expect("#1 " + str(alice)[:8] + ": Rendez-vous à l'École demain\r\n")
        b.type("/search tomorrow")
        await b.expect("-- nothing found --")  # the edit replaced the old words' tokens
        b.type("/search friday")
        await b.expect("#2 " + str(alice)[:8] + ": the release is on Friday\r\n")
        b.type("/edit 1 not mine")
        await b.expect("forbidden")
    finally:
        a.close()
        b.close()
