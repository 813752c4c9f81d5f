"""The Ollama-compatible API Clair serves on CLAIR_OLLAMA_PORT: one gate for every other client.

Other programs on the box (Open WebUI, editor plugins, scripts, agents) talk to Ollama directly, and
no lock of Clair's sees them load a model in the middle of a render. Pointed at this port instead
(only their OLLAMA_HOST changes; or none, once Ollama moves to a private port: docs/gateway.md),
their requests go through the same arbiter as Clair's own tabs:

* `POST /api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings` need the GPU. Each takes a chat
  lease like a Chat-tab message (the front door's `Job.hold`, clair/service.py): held during a render, listed in the queue as
  `api:<model> (<client>)`, and forwarded only once granted. The body is forwarded as sent, except what
  Clair decides for the GPU's sake (logged when it differs from what the client asked):
  - `keep_alive`: Clair's CLAIR_KEEP_ALIVE when the client sends none, a negative one (forever) or a
    longer one; a shorter one, or 0, is kept.
  - `options.num_ctx`: always CLAIR_CHAT_NUM_CTX (replaced, not capped). One context size means one
    runner shape: clients asking for different sizes would otherwise make Ollama reload the model
    between them, and the ledger's estimate of the model's size would be wrong. (Embeddings: capped,
    since an embedding model's own context may be shorter.)
  The answer (NDJSON stream or one JSON object) is relayed chunk by chunk as Ollama sends it; Ollama's
  errors come back with its status code and `{"error": ...}` body.
* A load (no messages / no prompt) is a GPU request too. An unload (no messages / no prompt and
  `keep_alive: 0`) frees memory: it takes no lease, and the ledger is re-read from /api/ps after it.
* `GET /`, `/api/version`, `/api/tags`, `/api/ps` and `POST /api/show` need no GPU and pass straight
  through. Model management (`pull`, `push`, `create`, `copy`, `delete`, blobs) is refused: do it with
  the `ollama` command on the host.
* `/v1/...` are Clair's OpenAI-compatible endpoints (clair/openai_api.py), as on Ollama's own port.

Every GPU request counts against the UI's caps (`job_slot`: CLAIR_MAX_JOBS_PER_USER per key's user, or
per address without a key; CLAIR_MAX_QUEUE for the house); past one it is answered 429.

Who may use it: the port is bound like Clair (loopback unless --listen). A request from another
machine needs a key (`Authorization: Bearer`, `python app.py addkey NAME`) whenever Clair has users.
One from this machine needs none: Ollama itself, on its private loopback port, answers anyone here
without a key, so a key would protect nothing. Host names are checked as on the web port (DNS
rebinding), and a browser page from another origin (not loopback) cannot send requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clair.errors import Cancelled, ClairError, GpuBusy

log = logging.getLogger("clair.gateway")

MAX_BODY = 64 * 1024 * 1024  # chat requests may carry base64 images
PASS_GET = ("/", "/api/version", "/api/tags", "/api/ps")
GPU_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
MANAGE = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")


# --- running blocking work without starving the server ---------------------------------------------

_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def limiter() -> anyio.CapacityLimiter:
    """Worker threads for requests that wait for the GPU, apart from the server's (and Gradio's) own pool:
    a queue of held API requests must not take every thread the UI needs (CLAIR_MAX_QUEUE bounds how many
    wait at once). One per event loop."""
    loop = asyncio.get_running_loop()
    lim = _limiters.get(loop)
    if lim is None:
        lim = _limiters[loop] = anyio.CapacityLimiter(256)
    return lim


async def in_thread(fn: Callable, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args, limiter=limiter())


Send = Callable[[dict], Awaitable[None]]


class Gone(threading.Event):
    """Set once the client has disconnected; also sets the events linked to it. Pass a linked event, not
    this one, to code that may set it itself (an engine sets its `stop` when its reply ends)."""

    def __init__(self) -> None:
        super().__init__()
        self._linked: list[threading.Event] = []

    def link(self, event: threading.Event) -> threading.Event:
        self._linked.append(event)
        if self.is_set():
            event.set()
        return event

    def set(self) -> None:
        super().set()
        for event in self._linked:
            event.set()


class Exchange(Response):
    """A response that runs `work(send, gone)` itself, so what it holds is released whatever happens.

    `work` sends the response (it decides the status once it knows it, e.g. after the GPU was granted
    and Ollama answered). `gone` is set as soon as the client disconnects, also while nothing is being
    sent (a request held for a render), so the wait ends and the lease goes back.
    """

    def __init__(self, work: Callable[[Send, Gone], Awaitable[None]], shape: Callable[[str], dict] | None = None):
        self.work = work
        self.shape = shape or (lambda message: {"error": message})  # an error body, as this API shapes them
        self.background = None
        self.status_code = 200
        self.raw_headers = []

    async def __call__(self, scope, receive, send) -> None:
        gone = Gone()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        started = False

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if gone.is_set():
                raise OSError("the client went away")
            started = started or message["type"] == "http.response.start"
            await send(message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                await self.work(guarded_send, gone)
            except OSError:
                gone.set()
            except Exception as exc:  # a bug: logged with an id; the client gets the id, not the exception
                from clair.limits import unexpected

                text = unexpected(log, exc, "an API request")
                if not started and not gone.is_set():
                    await send_json(send, 500, self.shape(text))
            finally:
                tg.cancel_scope.cancel()


def closing_send(send: Send, stack: contextlib.ExitStack) -> Send:
    """`send`, closing `stack` (a job slot, a lease) just before the last bytes of the response go out."""

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with anyio.CancelScope(shield=True):
                await in_thread(stack.close)
        await send(message)

    return wrapped


async def send_json(send: Send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(obj).encode()
    raw = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# --- keep_alive and num_ctx --------------------------------------------------------------------------

_GO_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")  # ASCII digits only, as Go


def keep_alive_seconds(value: Any) -> float | None:
    """A keep_alive as Ollama reads it: None when absent; seconds (inf for a negative one).

    JSON numbers are seconds; strings are Go durations ("5m", "1h30m", "-1s"); Ollama rejects anything else
    with 400 before it loads anything (Ollama's docs/api.md, "keep_alive"), and so does Clair. Raises
    ValueError with Go's message.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, int | float):
        return float("inf") if value < 0 else float(int(value))
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("+", "-") else text  # one sign at most, as Go's time.ParseDuration
    if body == "0":
        return 0.0
    if re.fullmatch(r"[0-9]+(\.[0-9]*)?", body):
        raise ValueError(f'time: missing unit in duration "{value}"')
    pos, total = 0, 0.0
    while pos < len(body):
        m = _GO_PART.match(body, pos)
        if not m:
            raise ValueError(f'time: invalid duration "{value}"')
        total += float(m.group(1)) * _GO_UNIT[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f'time: invalid duration "{value}"')
    return float("inf") if sign < 0 and total > 0 else total  # "-0s" is 0 (unload), not forever


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def over_limits(body: dict, cfg) -> str:
    """Clair's text limits (clair/limits.py), for the Ollama-compatible API: what is wrong, or "".

    The conversation's text in all (CLAIR_MAX_HISTORY_CHARS plus one CLAIR_MAX_MESSAGE_CHARS) and its
    messages (CLAIR_MAX_HISTORY_MESSAGES plus the new one), or a prompt (CLAIR_MAX_MESSAGE_CHARS); refused
    before any GPU work, like the UI's and /v1's requests. Other fields are forwarded as sent."""
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > cfg.max_history_messages + 2:  # the history, a system prompt, the new message
            return f"too many messages ({len(messages)}): Clair takes at most {cfg.max_history_messages + 2} (CLAIR_MAX_HISTORY_MESSAGES)"
        chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
        if chars > cfg.max_history_chars + cfg.max_message_chars:
            return (
                f"the conversation is too long ({chars} characters): Clair takes at most "
                f"{cfg.max_history_chars + cfg.max_message_chars} (CLAIR_MAX_HISTORY_CHARS + CLAIR_MAX_MESSAGE_CHARS)"
            )
    for key in ("prompt", "system"):
        text = body.get(key)
        if isinstance(text, str) and len(text) > cfg.max_message_chars:
            return f"`{key}` is too long ({len(text)} characters): Clair takes at most {cfg.max_message_chars} (CLAIR_MAX_MESSAGE_CHARS)"
    return ""


def decide(body: dict, cfg, client: str, cap_only: bool = False) -> dict:
    """The body Clair forwards: keep_alive and options.num_ctx decided for the GPU (module docstring).

    `cap_only` (embeddings): a smaller num_ctx is kept, since an embedding model's own context may be
    shorter than CLAIR_CHAT_NUM_CTX; a missing or larger one becomes Clair's."""
    out = dict(body)
    shown = str(body.get("model"))[:80]
    ours = cfg.keep_alive_value
    ours_s = keep_alive_seconds(ours)
    theirs = body.get("keep_alive")
    theirs_s = keep_alive_seconds(theirs)  # already validated by the caller
    if theirs_s is None or theirs_s > (ours_s or 0):
        out["keep_alive"] = ours
        if theirs is not None:
            log.info(
                "gateway override client=%s model=%r keep_alive %r -> %r", client, shown, theirs, ours
            )
    options = body.get("options")
    if isinstance(options, dict) or options is None:
        options = dict(options or {})
        asked = options.get("num_ctx")
        small = cap_only and isinstance(asked, int) and not isinstance(asked, bool) and 0 < asked <= cfg.chat_num_ctx
        if asked != cfg.chat_num_ctx and not small:
            options["num_ctx"] = cfg.chat_num_ctx
            if asked is not None:
                log.info(
                    "gateway override client=%s model=%r num_ctx %r -> %d",
                    client,
                    shown,
                    asked,
                    cfg.chat_num_ctx,
                )
        out["options"] = options
    return out


# --- the app -----------------------------------------------------------------------------------------


async def read_capped(request: Request) -> bytes | None:
    """The request body, or None past MAX_BODY (a chunked body has no Content-Length to refuse early)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def job_slot(studio, user: str | None, address: str):
    """The front door's job for one GPU request (`Studio.job`, clair/service.py): it counts against its
    user's cap for the block (CLAIR_MAX_JOBS_PER_USER and CLAIR_MAX_QUEUE, as the UI's). A key's requests
    count as its name's (`user:NAME`, as a logged-in browser's), anonymous loopback ones by address.
    Raises GpuBusy past a cap.
    """
    return studio.job(f"user:{user}" if user else f"address:{address}", owner=user)


class Gateway:
    """The routes of the Ollama-compatible port; `app()` builds the ASGI app."""

    def __init__(self, studio, web):
        self.studio = studio
        self.cfg = studio.cfg
        self.web = web  # clair.web.Web: hosts, users, keys, the failed-key back-off
        self.url = self.cfg.ollama_url.rstrip("/")
        self.timeout = httpx.Timeout(self.cfg.ollama_timeout_s, connect=5.0)
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (making a client costs ~20 ms: it builds an SSL context)."""
        loop = asyncio.get_running_loop()
        c = self._clients.get(loop)
        if c is None:
            c = self._clients[loop] = httpx.AsyncClient(timeout=self.timeout, headers={"accept-encoding": "identity"})
        return c

    # -- who is asking ------------------------------------------------------------------------------
    def client_name(self, request: Request) -> str:
        user = request.scope.get("clair_api_user")
        addr = request.client.host if request.client else "?"
        return f"{user}@{addr}" if user else addr

    # -- pass-through -------------------------------------------------------------------------------
    async def passthrough(self, request: Request) -> Response:
        body = await read_capped(request) if request.method == "POST" else None
        if request.method == "POST" and body is None:
            return ollama_error(413, f"request too large: Clair takes at most {MAX_BODY // 2**20} MB")
        try:
            r = await self.client().request(
                request.method,
                self.url + request.url.path,
                content=body,
                headers={"content-type": "application/json"} if body is not None else None,
            )
        except httpx.HTTPError:
            return ollama_error(502, self.unreachable())
        keep = {k: v for k, v in r.headers.items() if k.lower() == "content-type"}
        return Response(r.content, status_code=r.status_code, headers=keep)

    def unreachable(self) -> str:
        return f"Clair cannot reach Ollama at {self.url}: start it (`sudo systemctl start ollama`) or check OLLAMA_HOST."

    async def refuse_management(self, request: Request) -> Response:
        return ollama_error(
            403, "Clair's Ollama port does not manage models: run `ollama pull`, `ollama rm` ... on the host itself."
        )

    # -- GPU requests -------------------------------------------------------------------------------
    async def gpu_request(self, request: Request) -> Response:
        path = request.url.path
        raw = await read_capped(request)
        if raw is None:
            return ollama_error(413, f"request too large: Clair takes at most {MAX_BODY // 2**20} MB")
        if not raw.strip():
            return ollama_error(400, "missing request body")
        try:
            # NaN and Infinity are not JSON (Go's decoder, so Ollama, refuses them): refused here too.
            body = json.loads(raw, parse_constant=_no_constant)
        except ValueError as exc:
            return ollama_error(400, f"invalid JSON: {exc}")
        if not isinstance(body, dict):
            return ollama_error(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            return ollama_error(400, "model is required")
        try:
            keep = keep_alive_seconds(body.get("keep_alive"))
        except ValueError as exc:
            return ollama_error(400, str(exc))
        too_long = over_limits(body, self.cfg)
        if too_long:
            return ollama_error(400, too_long)
        client = self.client_name(request)
        if path in ("/api/chat", "/api/generate"):
            empty = not body.get("messages") if path == "/api/chat" else not body.get("prompt")
        else:
            empty = False
        unload = empty and keep == 0
        forward = body if unload else decide(body, self.cfg, client, cap_only=path.startswith("/api/embed"))
        what = "unload" if unload else ("load" if empty else path.rsplit("/", 1)[-1])
        label = f"api:{model[:80]} ({client})"
        user = request.scope.get("clair_api_user")
        address = request.client.host if request.client else "?"

        async def work(send: Send, gone: Gone) -> None:
            await self.relay(
                send, gone, path, model, forward, label, gpu=not unload, what=what, user=user, address=address
            )

        return Exchange(work)

    async def relay(
        self,
        send: Send,
        gone: Gone,
        path: str,
        model: str,
        body: dict,
        label: str,
        gpu: bool,
        what: str,
        user: str | None,
        address: str,
    ) -> None:
        """Wait for the GPU (unless `gpu` is False), forward `body`, relay Ollama's answer as it comes.

        The job slot and the lease go back before the client sees the end of the answer, so a client
        that sends its next request at once is not refused for the one it has finished."""
        t0 = time.monotonic()
        waited, status = 0.0, 0
        stack = contextlib.ExitStack()  # the job: its slot and its lease; closed once, in a worker thread
        send = closing_send(send, stack)
        try:
            try:
                job = stack.enter_context(job_slot(self.studio, user, address))
            except GpuBusy as exc:  # a per-user cap, not the GPU's queue
                await send_json(send, 429, {"error": str(exc)}, {"retry-after": "5"})
                return
            gone.link(job.stop)
            try:
                await job.hold(self.studio.ollama, model, label, gpu=gpu)  # awaited on the loop: no thread
            except Cancelled:
                log.info("gateway %s model=%r (%r) gave up waiting for the GPU", what, model[:80], label)
                return
            except ClairError as exc:  # GpuBusy after CLAIR_QUEUE_TIMEOUT_S, an eviction that failed ...
                await send_json(send, 503, {"error": str(exc)})
                return
            waited = time.monotonic() - t0
            status = await self._forward(send, gone, path, body)
        finally:
            with anyio.CancelScope(shield=True):
                await in_thread(stack.close)
            log.info(
                "gateway %s model=%r client=%r status=%s wait_s=%.3f total_s=%.3f%s",
                what,
                model[:80],
                label,
                status or "-",
                waited,
                time.monotonic() - t0,
                " (client gone)" if gone.is_set() else "",
            )

    async def _forward(self, send: Send, gone: Gone, path: str, body: dict) -> int:
        started = False
        try:
            async with self.client().stream("POST", self.url + path, json=body) as r:
                ctype = r.headers.get("content-type", "application/json")
                await send(
                    {"type": "http.response.start", "status": r.status_code, "headers": [(b"content-type", ctype.encode())]}
                )
                started = True
                async for chunk in r.aiter_raw():
                    if gone.is_set():
                        break  # closing the stream aborts the request: Ollama stops generating
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return r.status_code
        except httpx.HTTPError as exc:
            if not started:
                await send_json(send, 502, {"error": self.unreachable()})
                return 502
            # Mid-stream, Ollama itself ends the stream with an error line under HTTP 200.
            line = json.dumps({"error": f"lost the connection to Ollama: {exc}"}).encode() + b"\n"
            await send({"type": "http.response.body", "body": line})
            return 200

    # -- the app --------------------------------------------------------------------------------------
    def app(self):
        from fastapi import FastAPI

        from clair.openai_api import router

        app = FastAPI(title="Clair (Ollama-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
        for path in PASS_GET:
            app.add_api_route(path, self.passthrough, methods=["GET", "HEAD"], include_in_schema=False)
        app.add_api_route("/api/show", self.passthrough, methods=["POST"], include_in_schema=False)
        for path in GPU_PATHS:
            app.add_api_route(path, self.gpu_request, methods=["POST"], include_in_schema=False)
        for path in MANAGE:
            app.add_api_route(path, self.refuse_management, methods=["POST", "DELETE", "HEAD"], include_in_schema=False)
        app.add_api_route("/api/blobs/{digest}", self.refuse_management, methods=["POST", "HEAD"], include_in_schema=False)
        app.include_router(router(self.studio))
        app.add_middleware(GatewayGuard, web=self.web)
        return app


# --- who may use the port ------------------------------------------------------------------------------


def _loopback_origin(origin: str) -> bool:
    from clair.web import Hosts, is_loopback_client

    name = Hosts.hostname(origin.split("://", 1)[-1]) if "://" in origin else None
    return bool(name) and (name == "localhost" or name.endswith(".localhost") or is_loopback_client(name))


class GatewayGuard:
    """Host allowlist, other origins, keys (module docstring). Answers refusals as Ollama would, or as
    OpenAI would under /v1."""

    def __init__(self, app, web):
        self.app = app
        self.web = web

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from clair.web import is_loopback_client

        web = self.web
        headers = Headers(scope=scope)
        address = (scope.get("client") or ("?", 0))[0]
        path = scope.get("path", "/")
        openai = path == "/v1" or path.startswith("/v1/")

        async def refuse(status: int, text: str, code: str, extra: dict | None = None) -> None:
            if openai:
                kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
                obj: dict = {"error": {"message": text, "type": kind, "code": code}}
            else:
                obj = {"error": text}
            await send_json(send, status, obj, extra)

        if not web.hosts.allowed(headers.get("host")):
            await refuse(421, "Clair does not answer to this host name (CLAIR_ALLOWED_HOSTS adds one).", "bad_host")
            return
        origin = headers.get("origin")
        unsafe = scope.get("method") not in ("GET", "HEAD", "OPTIONS")
        if unsafe and origin and not _loopback_origin(origin) and not web.origin_ok(origin, headers.get("host")):
            log.warning("gateway refused origin=%r addr=%s path=%s", origin[:100], address, path[:100])
            await refuse(403, "Requests from web pages of other sites are refused.", "forbidden_origin")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            await refuse(413, f"Request too large: Clair takes at most {MAX_BODY // 2**20} MB.", "too_large")
            return
        if not is_loopback_client(address):
            try:
                verdict = web.api_key_check(headers, address)
            except Exception:  # the users file cannot be read: refuse, as the web port does
                log.exception("the users file cannot be read")
                await refuse(503, "Clair's users file cannot be read: tell whoever runs Clair.", "server_error")
                return
            if verdict.status:
                await refuse(verdict.status, verdict.message, verdict.code, verdict.headers)
                return
            if verdict.user:
                scope = {**scope, "clair_api_user": verdict.user}
        await self.app(scope, receive, send)
