"""An asyncpg connection class that counts what its callers ask of PostgreSQL: statements
run (asyncpg's own reset of a released connection included: a round trip too) and rows
returned, over every connection of a pool made with
`connection_class=CountingConnection` (tests/test_reconcile.py, bench/reconcile.py)."""

from __future__ import annotations

from typing import Any

import asyncpg


class CountingConnection(asyncpg.Connection):  # type: ignore[misc]
    """Class-wide counters (a pool makes its connections itself): reset them with
    `CountingConnection.reset_counts()` before the part being counted."""

    statements = 0
    rows = 0

    @classmethod
    def reset_counts(cls) -> None:
        CountingConnection.statements = CountingConnection.rows = 0

    async def fetch(self, *args: Any, **kwargs: Any) -> list[Any]:
        got = await super().fetch(*args, **kwargs)
        CountingConnection.statements += 1
        CountingConnection.rows += len(got)
        return got  # type: ignore[no-any-return]

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.statements += 1
        got = await super().fetchrow(*args, **kwargs)
        CountingConnection.rows += got is not None
        return got

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.statements += 1
        CountingConnection.rows += 1
        return await super().fetchval(*args, **kwargs)

    async def execute(self, *args: Any, **kwargs: Any) -> str:
        CountingConnection.statements += 1
        return await super().execute(*args, **kwargs)  # type: ignore[no-any-return]
