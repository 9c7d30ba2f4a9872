"""Compression before encryption, measured on realistic chat messages (issue 10, item 6).

    .venv/bin/python -m bench.compression [--seed 1] [--count 20000]

The corpus is generated (deterministic for a seed) from the kinds of text a group chat
carries: short replies, sentences in French and English, emoji, URLs, pasted log lines
and stack traces, code snippets. For each message it compares the sealed content size
(client/hoomi_client/crypto.py's envelope: 37-byte header, padding to 32 bytes, 16-byte tag) without
compression and with zlib (level 6) or zstd (level 3, if the `zstandard` package is
installed), per size bucket of the plaintext, with the CPU time per message. The size a
compressor "saves" is the padded envelope's, since that is what the hub stores and sees.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib
from collections.abc import Callable

try:
    import zstandard
except ImportError:  # optional: the bench says so
    zstandard = None  # type: ignore[assignment]

HEADER, PAD, TAG = 37, 32, 16

SHORT = ["ok", "oui", "merci !", "on my way", "👍", "lol", "d'accord, à ce soir",
         "haha 😂😂", "yes!", "can't make it today, sorry", "c'est noté 👌", "brb", "🎉🎉🎉",
         "sounds good", "je regarde ça", "did you see the email?", "ça marche", "np"]
WORDS_EN = ("the meeting tomorrow deploy release server database please check when could "
            "review branch fixed issue customer report schedule weekend dinner train late "
            "thanks looks great merge test failing again after update").split()
WORDS_FR = ("demain réunion déploiement serveur base données peux-tu vérifier quand "
            "été problème corrigé client rapport semaine dîner train retard merci très "
            "bien fusionner échoue encore après mise à jour élève école").split()
EMOJI = ["😀", "🙏", "🔥", "✅", "❤️", "🚀", "🤔", "👀", "🇫🇷", "👨‍👩‍👧"]
HOSTS = ["github.com/hoomi/hub/pull", "docs.python.org/3/library", "www.lemonde.fr/societe",
         "youtu.be", "maps.app.goo.gl", "example.org/a/b"]
LEVELS = ["INFO", "WARN", "ERROR", "DEBUG"]


def _sentence(rng: random.Random) -> str:
    words = WORDS_FR if rng.random() < 0.5 else WORDS_EN
    s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 25)))
    if rng.random() < 0.3:
        s += " " + rng.choice(EMOJI)
    return s.capitalize() + rng.choice([".", "!", "?", ""])


def _url(rng: random.Random) -> str:
    return (f"https://{rng.choice(HOSTS)}/{rng.randint(1, 99999)}"
            f"?utm_source=chat&id={rng.getrandbits(64):x}")


def _log(rng: random.Random) -> str:
    lines = []
    for i in range(rng.randint(5, 60)):
        lines.append(f"2026-11-{rng.randint(1, 30):02d}T12:{i % 60:02d}:{rng.randint(0, 59):02d}"
                     f".{rng.randint(0, 999):03d}Z {rng.choice(LEVELS)} "
                     f"[worker-{rng.randint(1, 8)}] "
                     f"hub.writer batch of {rng.randint(1, 256)} committed in "
                     f"{rng.random() * 20:.2f} ms (queue {rng.randint(0, 4000)})")
    if rng.random() < 0.5:
        lines += ["Traceback (most recent call last):",
                  '  File "/srv/hoomi/server/ws.py", line 212, in _read_loop',
                  "    frame = session.receive(data)",
                  '  File "/srv/hoomi/protocol/codec.py", line 331, in decode_client',
                  "    raise ProtocolError(ErrorCode.INVALID, ...)",
                  "protocol.errors.ProtocolError: nonce: must be exactly 12 bytes"]
    return "\n".join(lines)


def _code(rng: random.Random) -> str:
    body = [f"    x{i} = await conn.fetchval('SELECT count(*) FROM messages WHERE seq > $1', {i})"
            for i in range(rng.randint(3, 30))]
    return "```python\nasync def f(conn):\n" + "\n".join(body) + "\n    return x0\n```"


def message(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.40:
        return rng.choice(SHORT)
    if r < 0.75:
        return " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
    if r < 0.85:
        return _sentence(rng) + " " + _url(rng)
    if r < 0.95:
        return _log(rng)
    return _code(rng)


def sealed_size(body: int) -> int:
    size = HEADER + body
    return size + (-size % PAD) + TAG


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=20000)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    corpus = [message(rng).encode() for _ in range(args.count)]
    codecs: dict[str, Callable[[bytes], bytes]] = {"zlib-6": lambda b: zlib.compress(b, 6)}
    if zstandard is not None:
        cctx = zstandard.ZstdCompressor(level=3)
        codecs["zstd-3"] = cctx.compress
    buckets = [(0, 64), (64, 256), (256, 512), (512, 1024), (1024, 4096), (4096, 1 << 20)]
    print(f"corpus: {len(corpus)} messages, {sum(map(len, corpus))} bytes of UTF-8, "
          f"median {statistics.median(map(len, corpus)):.0f} B; seed {args.seed}")
    print(f"{'plaintext':>12} {'n':>6} {'sealed':>9} " + " ".join(
        f"{name + ' sealed':>14} {name + ' µs':>10}" for name in codecs))
    for lo, hi in buckets:
        group = [m for m in corpus if lo <= len(m) < hi]
        if not group:
            continue
        plain = sum(sealed_size(len(m)) for m in group)
        cols = []
        for compress in codecs.values():
            t0 = time.perf_counter()
            out = [compress(m) for m in group]
            us = (time.perf_counter() - t0) / len(group) * 1e6
            # The client keeps the smaller of the two (the envelope's flag says which).
            best = sum(min(sealed_size(len(c) + 1), sealed_size(len(m)))
                       for c, m in zip(out, group, strict=True))
            cols.append(f"{best / plain:>13.1%} {us:>10.1f}")
        print(f"{f'{lo}-{hi}':>12} {len(group):>6} {plain:>9} " + " ".join(cols))
    total = sum(sealed_size(len(m)) for m in corpus)
    for name, compress in codecs.items():
        for threshold in (0, 256, 512, 1024):
            kept = sum(min(sealed_size(len(compress(m)) + 1), sealed_size(len(m)))
                       if len(m) >= threshold else sealed_size(len(m)) for m in corpus)
            print(f"{name} above {threshold:>4} B: all messages sealed to {kept / total:.1%} "
                  "of uncompressed")


if __name__ == "__main__":
    main()
