"""bench/httpload.py, the load generator's HTTP client, against uvicorn (the hub's own
HTTP server) over a real loopback socket: kept-alive requests, bodies past one read,
error statuses, and the responses it does not speak refused with a reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench import httpload
from server.testing.loopback import free_port

BIG = bytes(range(256)) * 1000  # 256 000 bytes: many reads


async def _who(request: Request) -> Response:
    return JSONResponse({"auth": request.headers.get("authorization"),
                         "q": request.query_params.get("q")})


async def _big(request: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


async def _missing(request: Request) -> Response:
    return JSONResponse({"error": "not_found", "field": "id"}, status_code=404)


async def _chunked(request: Request) -> Response:
    async def parts() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"
    return StreamingResponse(parts())


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/who", _who), Route("/big", _big),
                            Route("/missing", _missing), Route("/chunked", _chunked)])
    port = free_port()
    # log_config=None: uvicorn's default would reconfigure the process's logging (its
    # loggers stop propagating to the root, which in-process replicas read their log from).
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def test_lean_client_keeps_one_connection_for_many_requests(url: str) -> None:
    conn = await httpload.connect(url, {"Authorization": "Bearer t0k"})
    try:
        for k in range(3):
            status, body = await asyncio.wait_for(conn.get(f"/who?q={k}"), 5)
            assert status == 200
            assert body == f'{{"auth":"Bearer t0k","q":"{k}"}}'.encode()
        status, body = await asyncio.wait_for(conn.get("/big"), 5)
        assert (status, body) == (200, BIG)
        status, body = await asyncio.wait_for(conn.get("/missing"), 5)
        assert (status, body) == (404, b'{"error":"not_found","field":"id"}')
        # Still the same connection after all of them.
        assert (await asyncio.wait_for(conn.get("/who?q=last"), 5))[0] == 200
        assert conn.error is None
    finally:
        conn.close()


async def test_lean_client_refuses_what_it_does_not_speak(url: str) -> None:
    conn = await httpload.connect(url)
    with pytest.raises(httpload.HttpError, match="Content-Length"):
        await asyncio.wait_for(conn.get("/chunked"), 5)
    with pytest.raises(httpload.HttpError):  # the connection is gone with it
        await conn.get("/who")
    with pytest.raises(ValueError, match="http://"):
        await httpload.connect("https://127.0.0.1:1/")
