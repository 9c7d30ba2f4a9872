"""The browser SDK (client/web) and the Python SDK read each other's messages: a message
sealed by one opens in the other, byte for byte, and both derive the same passphrase key.

The JavaScript side is the real SDK module run by Node 20 (its WebCrypto is the same
AES-GCM API a browser has), through client/web/test/interop.mjs."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from uuid import UUID, uuid4

import pytest

from hoomi_client.crypto import MAX_PLAINTEXT, DecryptError, decrypt, encrypt
from hoomi_client.keys import key_from_passphrase, new_key
from server.testing.replica import ROOT

WEB = ROOT / "client" / "web"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(
    NODE is None or not (WEB / "node_modules" / "@msgpack").is_dir(),
    reason="node 20 and client/web/node_modules are needed (make test runs npm ci)")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def run_js(job: dict[str, object]) -> dict[str, list]:
    assert NODE is not None
    done = subprocess.run([NODE, str(WEB / "test" / "interop.mjs")], input=json.dumps(job),
                          capture_output=True, text=True, timeout=60, cwd=WEB,
                          env={**os.environ, "NODE_NO_WARNINGS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


BODIES = [b"", "héllo ✓ 🌍".encode(), bytes(range(28)), os.urandom(1000),
          os.urandom(MAX_PLAINTEXT)]


def test_sealed_by_python_opens_in_the_browser_sdk_and_the_reverse() -> None:
    key = new_key("k7-interop")
    hoomi, sender = uuid4(), uuid4()
    cmids = [uuid4() for _ in BODIES]
    from_python = [encrypt(key, hoomi, sender, c, b) for c, b in zip(cmids, BODIES, strict=True)]
    result = run_js({
        "key": b64(key.key), "session_id": key.session_id, "hoomi_id": str(hoomi),
        "seal": [{"sender_id": str(sender), "client_msg_id": str(c), "body": b64(b)}
                 for c, b in zip(cmids, BODIES, strict=True)],
        "open": [{"sender_id": str(sender), "content": b64(s.content), "nonce": b64(s.nonce),
                  "session_id": s.session_id} for s in from_python]
        # A Python message opened as another sender's, and in another session: refused.
        + [{"sender_id": str(uuid4()), "content": b64(from_python[1].content),
            "nonce": b64(from_python[1].nonce), "session_id": key.session_id},
           {"sender_id": str(sender), "content": b64(from_python[1].content),
            "nonce": b64(from_python[1].nonce), "session_id": "k8"}],
    })
    # Python -> browser SDK
    opened = result["opened"]
    assert [base64.b64decode(o["body"]) for o in opened[:len(BODIES)]] == BODIES
    assert [o["client_msg_id"] for o in opened[:len(BODIES)]] == [str(c) for c in cmids]
    assert {o["sender_id"] for o in opened[:len(BODIES)]} == {str(sender)}
    assert opened[len(BODIES):] == [{"error": "tampered"}, {"error": "unknown_session"}]
    # browser SDK -> Python, with the same sizes (the same padding rule)
    for sealed, body, cmid, py in zip(result["sealed"], BODIES, cmids, from_python, strict=True):
        content, nonce = base64.b64decode(sealed["content"]), base64.b64decode(sealed["nonce"])
        assert sealed["session_id"] == key.session_id
        assert len(content) == len(py.content) and len(nonce) == 12
        got = decrypt(key, hoomi, sender, content, nonce, sealed["session_id"])
        assert (got.plaintext, got.client_msg_id, got.sealed_by) == (body, cmid, sender)
        with pytest.raises(DecryptError) as err:
            decrypt(key, uuid4(), sender, content, nonce, sealed["session_id"])
        assert err.value.reason == "tampered"


def test_both_sdks_derive_the_same_passphrase_key() -> None:
    cases = [("correct horse battery staple", uuid4()), ("café crème", uuid4()),
             ("cafe\u0301 cre\u0300me", UUID("7c9e6679-7425-40de-944b-e07fc1f90ae7"))]
    result = run_js({"key": b64(bytes(32)), "session_id": "k1", "hoomi_id": str(uuid4()),
                     "passphrases": [{"passphrase": p, "hoomi_id": str(h)} for p, h in cases]})
    assert result["derived"] == [key_from_passphrase(p, h).key.hex() for p, h in cases]


def test_scheme_2_compressed_messages_open_both_ways() -> None:
    key = new_key("k2-interop")
    hoomi, sender = uuid4(), uuid4()
    bodies = [b"short, not compressed", ("compressible text " * 200).encode(),
              os.urandom(2000)]
    cmids = [uuid4() for _ in bodies]
    from_python = [encrypt(key, hoomi, sender, c, b, scheme=2)
                   for c, b in zip(cmids, bodies, strict=True)]
    assert len(from_python[1].content) < len(bodies[1]) // 4  # compressed
    result = run_js({
        "key": b64(key.key), "session_id": key.session_id, "hoomi_id": str(hoomi),
        "seal": [{"sender_id": str(sender), "client_msg_id": str(c), "body": b64(b),
                  "scheme": 2} for c, b in zip(cmids, bodies, strict=True)],
        "open": [{"sender_id": str(sender), "content": b64(s.content), "nonce": b64(s.nonce),
                  "session_id": s.session_id, "scheme": 2} for s in from_python]
        # Relabelled to scheme 1 by the hub: refused.
        + [{"sender_id": str(sender), "content": b64(from_python[1].content),
            "nonce": b64(from_python[1].nonce), "session_id": key.session_id, "scheme": 1}],
    })
    assert [base64.b64decode(o["body"]) for o in result["opened"][:3]] == bodies
    assert result["opened"][3] == {"error": "tampered"}
    for sealed, body, cmid, py in zip(result["sealed"], bodies, cmids, from_python,
                                      strict=True):
        content, nonce = base64.b64decode(sealed["content"]), base64.b64decode(sealed["nonce"])
        assert sealed["scheme"] == 2 and len(content) == len(py.content)
        got = decrypt(key, hoomi, sender, content, nonce, sealed["session_id"], scheme=2)
        assert (got.plaintext, got.client_msg_id) == (body, cmid)
