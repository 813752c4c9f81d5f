"""The access log (clair/edge/access.py): one line per request, with status, client, user and seconds; a refusal
logged too; what a page polls by itself kept at DEBUG; a client's path never breaks a line."""

from __future__ import annotations

import logging

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from clair.edge.access import AccessLog


class FakeWeb:
    """The two lookups the access log makes, with their own data: a key's name and a browser's login."""

    class keys:  # shaped like clair.edge.keys.Keys
        @staticmethod
        def verify(key):
            return {"clair-good": "ann"}.get(key)

    @staticmethod
    def user(headers):
        return "bob" if headers.get("cookie") == "session=ok" else None


def app():
    async def ok(request):
        return PlainTextResponse("ok")

    async def refuse(request):
        return PlainTextResponse("no", status_code=401)

    routes = [Route("/v1/models", ok), Route("/denied", refuse), Route("/gradio_api/heartbeat/x", ok)]
    return AccessLog(Starlette(routes=routes), FakeWeb(), "web")


def lines(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == "clair.edge.access" and r.levelno >= level]


async def _get(path, **kw):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app()), base_url="http://test") as c:
        return await c.get(path, **kw)


def test_each_request_gets_one_line_with_whose_it_was(caplog):
    import asyncio

    caplog.set_level(logging.DEBUG, logger="clair.edge.access")
    asyncio.run(_get("/v1/models", headers={"Authorization": "Bearer clair-good"}))
    asyncio.run(_get("/v1/models", headers={"cookie": "session=ok"}))
    asyncio.run(_get("/denied", headers={"Authorization": "Bearer clair-wrong"}))
    asyncio.run(_get("/gradio_api/heartbeat/x"))
    asyncio.run(_get("/evil%0AFAKE%20access%20line"))  # decoded into the path: a newline
    info = lines(caplog)
    assert len(info) == 4, info  # the heartbeat is DEBUG
    assert info[0].startswith("access method=GET path='/v1/models' status=200 client=127.0.0.1 user=ann s=")
    assert "user=bob" in info[1] and info[1].endswith("port=web")
    assert "path='/denied' status=401" in info[2] and "user=-" in info[2]
    assert "\n" not in info[3] and "status=404" in info[3]  # the newline is quoted, not a line of its own
    assert any("heartbeat" in m for m in lines(caplog, logging.DEBUG))
