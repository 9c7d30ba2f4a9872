"""PostgreSQL's data files read directly, to prove erased bytes are gone: a relation's
files (all segments, after the caller's CHECKPOINT), and a heap page split into what its
line pointers point at and its free space (bufpage.h, itemid.h)."""

from __future__ import annotations

import struct
from pathlib import Path

import asyncpg

PAGE = 8192
LP_NORMAL = 1


async def relation_bytes(conn: asyncpg.Connection, relation: str) -> bytes:
    datadir = Path(await conn.fetchval("SHOW data_directory"))
    first = datadir / await conn.fetchval("SELECT pg_relation_filepath($1::regclass)",
                                          relation)
    data, segment = first.read_bytes(), 1
    while (more := first.with_name(f"{first.name}.{segment}")).exists():
        data += more.read_bytes()
        segment += 1
    return data


def split_pages(data: bytes) -> tuple[bytes, bytes]:
    """(bytes of every tuple a line pointer points at, bytes of every page's free space)."""
    tuples, free = [], []
    for start in range(0, len(data), PAGE):
        page = data[start:start + PAGE]
        lower, upper = struct.unpack_from("<HH", page, 12)  # pd_lower, pd_upper
        if lower == 0:
            continue  # a new, all-zero page
        free.append(page[lower:upper])
        for at in range(24, lower, 4):  # ItemIdData: lp_off:15, lp_flags:2, lp_len:15
            (item,) = struct.unpack_from("<I", page, at)
            off, flags, length = item & 0x7FFF, (item >> 15) & 3, item >> 17
            if flags == LP_NORMAL:
                tuples.append(page[off:off + length])
    return b"\0".join(tuples), b"\0".join(free)
