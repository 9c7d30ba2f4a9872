"""Small builders for test data, going through storage's own functions."""

from __future__ import annotations

import os
from uuid import UUID, uuid4

import asyncpg

from storage.hoomis import create_hoomi
from storage.records import AppendRequest, Member
from storage.users import create_user


async def users(pool: asyncpg.Pool, n: int) -> list[UUID]:
    return [await create_user(pool) for _ in range(n)]


async def hoomi(pool: asyncpg.Pool, admins: list[UUID], members: list[UUID] = ()) -> UUID:  # type: ignore[assignment]
    roster = [Member(u, "admin") for u in admins] + [Member(u, "member") for u in members]
    return await create_hoomi(pool, roster)


def request(hoomi_id: UUID, sender_id: UUID, client_msg_id: UUID | None = None,
            size: int = 48, session_id: str = "s1") -> AppendRequest:
    return AppendRequest(hoomi_id, sender_id, client_msg_id or uuid4(), os.urandom(size),
                         os.urandom(12), session_id)
