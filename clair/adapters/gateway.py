"""The Ollama-compatible API Clair serves on CLAIR_OLLAMA_PORT: one gate for every other client.

Other programs on the box (Open WebUI, editor plugins, scripts, agents) talk to Ollama directly, and
no lock of Clair's sees them load a model in the middle of a render. Pointed at this port instead
(only their OLLAMA_HOST changes; or none, once Ollama moves to a private port: docs/gateway.md),
their requests go through the same arbiter as Clair's own tabs:

* `POST /api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings` need the GPU. Each takes a chat
  lease like a Chat-tab message (the front door's `Job.hold`, clair/service/front.py): held during a render, listed in the queue as
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
* `/v1` is Ollama's own OpenAI-compatible API, as on Ollama's port: `GET /v1/models[/NAME]` passes
  through; `POST /v1/chat/completions`, `/v1/completions` and `/v1/embeddings` wait for the GPU like
  `/api/chat`. Nothing else under /v1 is forwarded, and no path that `..` would lead elsewhere (a
  `/v1/../api/pull` must not reach Ollama's management). Clair's own /v1 is on the web port.

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
import posixpath
import time
import weakref
from typing import Any

import anyio
import httpx
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clair.base.errors import Cancelled, ClairError, GpuBusy
from clair.base.helpers import go_duration_s
from clair.edge.guard import (
    OLLAMA,
    OPENAI,
    BadJson,
    Exchange,
    Gone,
    Send,
    closing_send,
    error_body,
    in_thread,
    job_slot,
    json_of,
    send_json,
)

log = logging.getLogger("clair.adapters.gateway")

MAX_BODY = 64 * 1024 * 1024  # chat requests may carry base64 images
PASS_GET = ("/", "/api/version", "/api/tags", "/api/ps")
GPU_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
# Ollama's own /v1 on this port: what passes through, and what waits for the GPU (everything else is 404).
V1_GET = ("/v1/models", "/v1/models/{model:path}")
V1_GPU = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MANAGE = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")


# --- keep_alive and num_ctx --------------------------------------------------------------------------

MAX_DURATION_CHARS = 40  # "1h2m3.5s" and the like; a longer keep_alive is no duration and is not repeated


def keep_alive_seconds(value: Any) -> float | None:
    """A keep_alive as Ollama reads it: None when absent; seconds (inf for a negative one).

    JSON numbers are seconds; strings are Go durations ("5m", "1h30m", "-1s"; clair.base.helpers.go_duration_s);
    Ollama rejects anything else with 400 before it loads anything (Ollama's docs/api.md, "keep_alive"),
    and so does Clair. Raises ValueError with Go's message.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, int | float):
        return float("inf") if value < 0 else float(int(value))
    if len(value) > MAX_DURATION_CHARS:
        # Go's message repeats the text; a client's megabytes are not handed back (the body may be 64 MB here).
        raise ValueError(f"time: invalid duration (a text of {len(value)} characters; use one like \"5m\" or \"1h\")")
    total = go_duration_s(value)
    return float("inf") if total < 0 else abs(total)  # "-0s" is 0 (unload), not forever


def plain_path(path: str) -> bool:
    """A path that means what it says: no `.` or `..` segment, no empty segment (the path is already
    percent-decoded, so `%2e%2e` and `%2f` count as what they decode to). A path that fails this is never
    forwarded: httpx would resolve `/v1/../api/pull` to Ollama's management endpoint."""
    return path.startswith("/") and posixpath.normpath(path) == path and "\\" not in path


def text_chars(value: Any) -> int:
    """Every character of text in a message's content, whatever its form: a string, or a list of parts
    (`[{"type": "text", "text": ...}]`, as OpenAI's clients send) holding strings at any depth."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(text_chars(v) for k, v in value.items() if k not in ("type", "image_url", "images"))
    return 0


def openai_error(status: int, message: str, code: str) -> JSONResponse:
    """An error on Ollama's /v1, shaped as OpenAI's (and Ollama's /v1) errors are."""
    return JSONResponse(error_body(OPENAI, status, message, code), status_code=status)


def over_limits(body: dict, cfg) -> str:
    """Clair's text limits (clair/service/limits.py), for the Ollama-compatible API: what is wrong, or "".

    The conversation's text in all (CLAIR_MAX_HISTORY_CHARS plus one CLAIR_MAX_MESSAGE_CHARS), counted in
    every form content takes, and its messages (CLAIR_MAX_HISTORY_MESSAGES plus the new one); a prompt or
    system text (CLAIR_MAX_MESSAGE_CHARS); the texts to embed (`input`: one string or a list, the same total
    as a conversation). Refused before any GPU work, like the UI's and /v1's requests. Other fields are
    forwarded as sent."""
    whole = cfg.max_history_chars + cfg.max_message_chars
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > cfg.max_history_messages + 2:  # the history, a system prompt, the new message
            return f"too many messages ({len(messages)}): Clair takes at most {cfg.max_history_messages + 2} (CLAIR_MAX_HISTORY_MESSAGES)"
        chars = sum(text_chars(m.get("content")) for m in messages if isinstance(m, dict))
        if chars > whole:
            return (
                f"the conversation is too long ({chars} characters): Clair takes at most "
                f"{whole} (CLAIR_MAX_HISTORY_CHARS + CLAIR_MAX_MESSAGE_CHARS)"
            )
    for key in ("prompt", "system"):
        chars = text_chars(body.get(key))
        if chars > cfg.max_message_chars:
            return f"`{key}` is too long ({chars} characters): Clair takes at most {cfg.max_message_chars} (CLAIR_MAX_MESSAGE_CHARS)"
    chars = text_chars(body.get("input"))
    if chars > whole:
        return f"`input` is too long ({chars} characters): Clair embeds at most {whole} (CLAIR_MAX_HISTORY_CHARS + CLAIR_MAX_MESSAGE_CHARS)"
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


def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(OLLAMA, status, message), status_code=status)


class Gateway:
    """The routes of the Ollama-compatible port; `app()` builds the ASGI app."""

    def __init__(self, studio, web):
        self.studio = studio
        self.cfg = studio.cfg
        self.web = web  # clair.edge.web.Web: hosts, users, keys, the failed-key back-off
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
    async def v1_unknown(self, request: Request) -> Response:
        return openai_error(404, "Clair's Ollama port forwards /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings only.", "not_found")

    async def passthrough(self, request: Request) -> Response:
        if not plain_path(request.url.path):
            return ollama_error(404, "not found")
        body = await request.body() if request.method == "POST" else None  # read within the guard's cap
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
        try:
            body = await json_of(request)  # the guard's reading: within its cap, parsed off the event loop
        except BadJson as exc:
            return ollama_error(400, f"invalid JSON: {exc}")
        if body is None:
            return ollama_error(400, "missing request body")
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
        missing = None if unload else await self.not_installed(model)  # an unload of any name is harmless
        if missing:
            return ollama_error(404, missing)
        forward = body if unload else decide(body, self.cfg, client, cap_only=path.startswith("/api/embed"))
        what = "unload" if unload else ("load" if empty else path.rsplit("/", 1)[-1])
        label = f"api:{model[:80]} ({client})"
        user = request.scope.get("clair_api_user")
        address = request.client.host if request.client else "?"

        async def work(send: Send, gone: Gone) -> None:
            await self.relay(
                send, gone, path, model, forward, label, gpu=not unload, what=what, user=user, address=address,
                headers=request.headers,
            )

        return Exchange(work)

    async def ollama_v1(self, request: Request) -> Response:
        """A POST to Ollama's /v1, forwarded as sent (`tools`, `stream`, `stream_options` and all) once the GPU
        is granted; Ollama's answer (its `usage` included) is relayed as it comes. Clair cannot pin num_ctx or
        keep_alive here (Ollama's /v1 takes neither): Ollama's own OLLAMA_CONTEXT_LENGTH and OLLAMA_KEEP_ALIVE
        apply (docs/gateway.md)."""
        path = request.url.path
        try:
            body = await json_of(request)  # the guard's reading: within its cap, parsed off the event loop
        except BadJson as exc:
            return openai_error(400, f"The body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(body, dict):
            return openai_error(400, "The body must be a JSON object.", "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            return openai_error(400, "`model` is required.", "invalid_model")
        too_long = over_limits(body, self.cfg)
        if too_long:
            return openai_error(400, too_long[0].upper() + too_long[1:] + ".", "too_long")
        missing = await self.not_installed(model)
        if missing:
            return openai_error(404, missing[0].upper() + missing[1:] + ".", "model_not_found")
        client = self.client_name(request)
        label = f"api:{model[:80]} ({client})"
        user = request.scope.get("clair_api_user")
        address = request.client.host if request.client else "?"

        async def work(send: Send, gone: Gone) -> None:
            await self.relay(
                send, gone, path, model, body, label, gpu=True, what="v1" + path[3:], user=user, address=address,
                headers=request.headers, protocol=OPENAI,
            )

        return Exchange(work, OPENAI)

    async def not_installed(self, model: str) -> str | None:
        """Ollama's own refusal when it has no such model, said here and at once; None when it has it or its list
        cannot be read (then Ollama decides). Ollama would answer 404 too, but only after Clair had leased the GPU
        for it, sized as an unknown 8B model: a made-up name evicted the image model. A long or odd name is not
        repeated back."""
        if await in_thread(self.studio.ollama.installed, model) is not False:
            return None
        if len(model) <= 80 and model.isprintable():
            return f"model '{model}' not found"
        return f"model not found (the name sent has {len(model)} characters)"

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
        headers: Headers | None = None,
        protocol: str = OLLAMA,
    ) -> None:
        """Wait for the GPU (unless `gpu` is False), forward `body`, relay Ollama's answer as it comes.
        Clair's own refusals are shaped as `protocol`'s errors (OpenAI's on Ollama's /v1).

        The job slot and the lease go back before the client sees the end of the answer, so a client
        that sends its next request at once is not refused for the one it has finished."""
        t0 = time.monotonic()
        waited, status, left = 0.0, 0, False
        stack = contextlib.ExitStack()  # the job: its slot and its lease; closed once, in a worker thread
        send = closing_send(send, stack)
        try:
            try:
                job = stack.enter_context(job_slot(self.studio, user, address, headers))
            except GpuBusy as exc:  # a per-user cap, not the GPU's queue
                status = 429
                await send_json(send, 429, error_body(protocol, 429, str(exc), "too_many_jobs"), {"retry-after": "5"})
                return
            gone.link(job.stop)
            try:
                await job.hold(self.studio.ollama, model, label, gpu=gpu)  # awaited on the loop: no thread
            except Cancelled:
                log.info("gateway %s model=%r (%r) gave up waiting for the GPU", what, model[:80], label)
                return
            except ClairError as exc:  # GpuBusy after CLAIR_QUEUE_TIMEOUT_S, an eviction that failed ...
                status = 503
                await send_json(send, 503, error_body(protocol, 503, str(exc), "gpu_busy"))
                return
            waited = time.monotonic() - t0
            status = await self._forward(send, gone, path, body, protocol)
            # Read now: once the answer is complete the client closes, and `gone` is set for that too.
            left = gone.is_set()
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
                " (client gone)" if left or (not status and gone.is_set()) else "",
            )

    async def _forward(self, send: Send, gone: Gone, path: str, body: dict, protocol: str = OLLAMA) -> int:
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
                await send_json(send, 502, error_body(protocol, 502, self.unreachable(), "ollama_unreachable"))
                return 502
            # Mid-stream, Ollama itself ends the stream with an error line under HTTP 200.
            line = json.dumps(error_body(protocol, 502, f"lost the connection to Ollama: {exc}")).encode() + b"\n"
            await send({"type": "http.response.body", "body": line})
            return 200

    # -- the app --------------------------------------------------------------------------------------
    def app(self):
        from fastapi import FastAPI

        app = FastAPI(title="Clair (Ollama-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
        for path in PASS_GET:
            app.add_api_route(path, self.passthrough, methods=["GET", "HEAD"], include_in_schema=False)
        app.add_api_route("/api/show", self.passthrough, methods=["POST"], include_in_schema=False)
        for path in GPU_PATHS:
            app.add_api_route(path, self.gpu_request, methods=["POST"], include_in_schema=False)
        for path in MANAGE:
            app.add_api_route(path, self.refuse_management, methods=["POST", "DELETE", "HEAD"], include_in_schema=False)
        app.add_api_route("/api/blobs/{digest}", self.refuse_management, methods=["POST", "HEAD"], include_in_schema=False)
        # /v1 here is Ollama's own OpenAI-compatible API, as a client of Ollama's port expects (the same models
        # as /api/tags): GETs pass through, POSTs (chat, completions, embeddings) wait for the GPU like /api/chat.
        # Clair's own /v1 (its image model included) is on the web port.
        for path in V1_GET:
            app.add_api_route(path, self.passthrough, methods=["GET", "HEAD"], include_in_schema=False)
        for path in V1_GPU:
            app.add_api_route(path, self.ollama_v1, methods=["POST"], include_in_schema=False)
        app.add_api_route("/v1/{rest:path}", self.v1_unknown, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
        from clair.edge.web import Guard

        # The web port's guard, this port's rules; a person's GPU requests past their cap are refused before
        # their body (up to 64 MB) is read, in the job slot's words.
        app.add_middleware(
            Guard, web=self.web, port=OLLAMA, max_body=MAX_BODY, gpu_paths=GPU_PATHS + V1_GPU,
            busy=lambda: self.studio.jobs.busy_message("user"),
        )
        return app
