"""An install of release 0.x, before `messages` was partitioned (migrations 1..3): the data
tests/test_partitioning.py upgrades in place and tests/test_archive.py archives."""

from __future__ import annotations

import asyncpg

# Messages as release 0.x stored them (migrations 1..3): 200 Hoomis, 50 senders (some
# deleted: sender NULL), tombstones, contents from 16 B to 4 KiB (TOASTed), UUIDv7 ids.
_FILL = """
WITH h AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM hoomis),
     u AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM users),
     g AS (SELECT i FROM generate_series($1::int, $2::int) i)
INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, content, nonce,
                      session_id, created_at, updated_at, deleted_at)
SELECT uuidv7(), h.id, g.i / 200 + 1, CASE WHEN g.i % 97 = 0 THEN NULL ELSE u.id END,
       gen_random_uuid(),
       CASE WHEN g.i % 50 = 0 THEN NULL
            WHEN g.i % 1000 = 1 THEN decode(repeat(md5(random()::text), 128), 'hex')
            ELSE decode(repeat(md5(g.i::text || random()::text), 1 + g.i % 8), 'hex') END,
       CASE WHEN g.i % 50 = 0 THEN NULL
            ELSE decode(substr(md5(random()::text), 1, 24), 'hex') END,
       CASE WHEN g.i % 50 = 0 THEN NULL ELSE 'session-' || (g.i % 7) END,
       now() - make_interval(secs => $2 - g.i), now(),
       CASE WHEN g.i % 50 = 0 THEN now() END
FROM g JOIN h ON h.k = g.i % 200 JOIN u ON u.k = g.i % 50
"""


async def old_install(conn: asyncpg.Connection, n: int) -> None:
    """Fill a database at version 3 with n messages."""
    await conn.execute("INSERT INTO users (id) SELECT gen_random_uuid() "
                       "FROM generate_series(1, 50)")
    await conn.execute("INSERT INTO hoomis (id) SELECT gen_random_uuid() "
                       "FROM generate_series(1, 200)")
    for start in range(1, n + 1, 100_000):
        await conn.execute(_FILL, start, min(n, start + 99_999))
    await conn.execute("UPDATE hoomis SET last_seq = coalesce("
                       "(SELECT max(seq) FROM messages WHERE hoomi_id = hoomis.id), 0)")
    await conn.execute("ANALYZE messages")
