"""The access log: one line per HTTP request on Clair's web port and on its Ollama-compatible port.

`access method=POST path='/v1/chat/completions' status=200 client=192.168.1.20 user=ann s=1.234 port=web`

The status is what was sent (`-` when the client left before any answer); the user is the key's name on the
APIs, or the logged-in browser's, or `-`. The path is logged as a quoted string (a client's bytes never start a
log line of their own) and cut at 200 characters. Logged by `clair.edge.access` at INFO, except what a page does by
itself all the time (Gradio's timers, its event stream, static files, the watchdog's /healthz): that is DEBUG,
so the journal holds what people and programs asked for. Refusals (4xx, 5xx) pass the flood filter like any
other repeated line: a flood of them is summarised, not written out.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers

log = logging.getLogger("clair.edge.access")

# Requests a page or systemd makes on their own, every second or so: DEBUG.
ROUTINE_PREFIXES = (
    "/assets/", "/static/", "/svelte/", "/favicon", "/gradio_api/heartbeat", "/gradio_api/queue/data",
    "/gradio_api/run/predict", "/gradio_api/file=", "/config", "/theme.css", "/healthz", "/manifest.json",
    "/gradio_api/info", "/gradio_api/upload_progress",
)


class AccessLog:
    """ASGI middleware around a port's whole app (outside its guard, so refusals are logged too)."""

    def __init__(self, app, web, port: str):
        self.app, self.web, self.port = app, web, port

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status: list[int] = []

        async def sending(message):
            if message.get("type") == "http.response.start":
                status.append(message.get("status", 0))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.line(scope, status[0] if status else None, time.monotonic() - t0)

    def who(self, scope) -> str:
        """The key's user, else the browser's login, else '-' (read-only: no failed-key counting here)."""
        from clair.edge.keys import bearer

        headers = Headers(scope=scope)
        try:
            key = bearer(headers.get("authorization"))
            name = self.web.keys.verify(key) if key else None
            return name or self.web.user(headers) or "-"
        except Exception:
            return "-"

    def line(self, scope, status: int | None, seconds: float) -> None:
        path = str(scope.get("path", ""))
        level = logging.DEBUG if path.startswith(ROUTINE_PREFIXES) and (status or 0) < 400 else logging.INFO
        if not log.isEnabledFor(level):
            return
        client = (scope.get("client") or ("-", 0))[0]
        log.log(
            level,
            "access method=%s path=%r status=%s client=%s user=%s s=%.3f port=%s",
            str(scope.get("method", "?"))[:10], path[:200], status if status is not None else "-", client,
            self.who(scope), seconds, self.port,
            # Answered requests are each logged (the guard and the caps bound their rate); refusals and
            # abandoned ones go through the flood filter (clair.edge.web.RepeatFilter): a flood is made of those.
            extra={"clair_always": status is not None and status < 400},
        )
