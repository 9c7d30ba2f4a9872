"""storage.db.stateless: a connection lent for statements that leave no session state
goes back to the pool without asyncpg's reset round trip; every other use, and a
stateless block that raises, is reset as before."""

from __future__ import annotations

import pytest

from storage import db

_PROBE = "SELECT current_setting('hoomi.probe', true)"


async def test_only_a_stateless_block_that_ends_skips_the_reset(dsn):
    pool = await db.create_pool(dsn, min_size=1, max_size=1)  # one connection: the same
    try:
        # Session state left on purpose, to see whether the reset ran after each use.
        async with pool.acquire() as conn:
            await conn.execute("SELECT set_config('hoomi.probe', 'left', false)")
        assert await pool.fetchval(_PROBE) in (None, "")
        async with db.stateless(pool) as conn:
            await conn.execute("SELECT set_config('hoomi.probe', 'kept', false)")
        async with pool.acquire() as conn:
            assert await conn.fetchval(_PROBE) == "kept"  # not reset
        assert await pool.fetchval(_PROBE) in (None, "")  # the acquire above was reset
        with pytest.raises(RuntimeError):
            async with db.stateless(pool) as conn:
                await conn.execute("SELECT set_config('hoomi.probe', 'failed', false)")
                raise RuntimeError("the block failed")
        assert await pool.fetchval(_PROBE) in (None, "")
    finally:
        await pool.close()
