"""OpenAI-compatible endpoints under /v1, on Clair's web port (and on its Ollama port), through the arbiter.

* `GET /v1/models`: the chat models (Ollama's, or the in-process one) and the image model, apart (its id is
  `sdxl:<model>`, owned_by `clair-image`; a chat asking for it is refused with a message).
* `POST /v1/chat/completions`: `Studio.chat` (so the Chat tab's protocol: a chat lease, held during a
  render, listed in the queue as `api:<model> (<client>)`). `stream: true` answers Server-Sent Events:
  `chat.completion.chunk` objects, then `data: [DONE]`; while the request waits for the GPU, SSE comment
  lines (`: waiting for the GPU ...`) tell where it stands (clients ignore them). Clair decides the
  context size and the longest reply (CLAIR_CHAT_NUM_CTX, CLAIR_MAX_NEW_TOKENS), and there is no system
  prompt unless the messages carry one. Sampling fields (temperature, top_p, max_tokens, stop, seed ...)
  are not passed on. `usage` is the engine's count (Ollama's prompt_eval_count and eval_count; the
  in-process model's tokenizer), in the answer, and streamed as a last chunk with no choices when
  `stream_options.include_usage` asks for it, as OpenAI does. `tools` go to Ollama's /api/chat; the model's
  calls come back as OpenAI's `tool_calls` (finish_reason "tool_calls"), and the history may carry them
  and `tool` results. The in-process model calls no tools: it answers as if none were offered (clients
  such as Open WebUI send tools with every chat); a `tool_choice` that demands a call, or a history with
  tool calls or results (its chat template has no tool role), is refused (400).
* `POST /v1/images/generations`: `Studio.render` (a render lease; the image is saved with its parameters
  in PNG text chunks, as from the Image tab). `size` is "WIDTHxHEIGHT" (multiples of 8, 64 to CLAIR_MAX_SIDE;
  default 1024x1024); extra body fields, Clair's own: `steps` (default 30), `seed` (-1: random),
  `negative_prompt`, `guidance` (default 7). `n` is 1 to 4 (seeds seed, seed+1, ...). `response_format`
  `b64_json` returns the PNG itself; `url` (the default, as OpenAI's) a link to `/v1/files/<name>`,
  which serves only the PNGs /v1 rendered, to the user (key) that asked for them, from Clair's output
  folder by exact name, until Clair restarts.

Each request counts against the UI's caps (clair.edge.guard.job_slot; 429 past one). Errors are OpenAI-shaped: `{"error": {"message", "type", "code"}}`, 400 for a bad request, 401/429 for
keys (clair/edge/web.py), 503 when the engine or the GPU cannot serve. Who may call: clair/edge/keys.py.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from clair.base.errors import BadRequest, Cancelled, ChatUnavailable, ClairError, GpuBusy, ToolsUnsupported
from clair.edge.guard import (
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
from clair.engines.chat import flatten_history
from clair.engines.image import RenderParams
from clair.service.studio import Token, Waiting

log = logging.getLogger("clair.openai")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")
MAX_IMAGES = 4
MAX_ISSUED = 4096  # image URLs remembered for /v1/files


def error(status: int, message: str, code: str = "") -> JSONResponse:
    return JSONResponse(error_body(OPENAI, status, message, code), status_code=status)


def clair_error(exc: ClairError) -> tuple[int, dict]:
    """A ClairError as (status, OpenAI error object)."""
    if isinstance(exc, ToolsUnsupported):
        status, code = 400, "tools_unsupported"
    elif isinstance(exc, BadRequest):
        status, code = 400, "bad_request"
    elif isinstance(exc, GpuBusy):
        status, code = 503, "gpu_busy"
    elif isinstance(exc, ChatUnavailable):
        status, code = 503, "model_unavailable"
    else:
        status, code = 503, type(exc).__name__
    return status, error_body(OPENAI, status, str(exc), code)


# The image model's id in /v1/models lives in its own namespace, so it never equals a chat model's id (in demo
# mode both models are "tiny") and a client's model picker can tell the two kinds apart.
IMAGE_ID_PREFIX = "sdxl:"


def image_model_id(studio) -> str:
    return IMAGE_ID_PREFIX + studio.image.model_id


def client_name(request: Request) -> str:
    user = request.scope.get("clair_api_user")
    addr = request.client.host if request.client else "?"
    return f"{user}@{addr}" if user else addr


async def json_body(request: Request) -> dict | JSONResponse:
    try:
        body = await json_of(request)  # the guard's reading: within its cap, parsed off the event loop
    except BadJson as exc:
        return error(400, f"The body is not valid JSON: {exc}", "invalid_json")
    if not isinstance(body, dict):
        return error(400, "The body must be a JSON object.", "invalid_json")
    return body


MAX_TOOLS = 128


def openai_tools(tools: Any, tool_choice: Any) -> list[dict] | None:
    """The request's `tools` in Ollama's shape (function name, description, parameters), or None. BadRequest."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadRequest(f"`tools` must be a list of at most {MAX_TOOLS} functions.")
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest('Each tool must be {"type": "function", "function": {"name", "parameters"}}.')
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise BadRequest("A tool's `parameters` must be a JSON Schema object.")
        desc = fn.get("description") or ""
        out.append({"type": "function", "function": {"name": fn["name"], "description": str(desc), "parameters": params}})
    if tool_choice == "none":
        return None
    return out


def ollama_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's history in Ollama's shape: an assistant's tool_calls with arguments as objects, a `tool`
    result named by the call it answers (Ollama's tool_name). Raises BadRequest or ValueError."""
    names: dict[str, str] = {}
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise BadRequest("An assistant's `tool_calls` must be a list.")
            shaped = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest("Each of an assistant's tool_calls needs a function name.")
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    raise BadRequest("A tool call's `arguments` must be a JSON object (as a string).") from None
                if not isinstance(args, dict):
                    raise BadRequest("A tool call's `arguments` must be a JSON object (as a string).")
                if isinstance(call.get("id"), str):
                    names[call["id"]] = fn["name"]
                shaped.append({"function": {"name": fn["name"], "arguments": args}})
            text = flatten_history([{"role": "assistant", "content": m.get("content")}])
            out.append({"role": "assistant", "content": text[0]["content"] if text else "", "tool_calls": shaped})
        elif role == "tool":
            text = flatten_history([{"role": "user", "content": m.get("content")}])
            entry = {"role": "tool", "content": text[0]["content"] if text else ""}
            name = names.get(m.get("tool_call_id")) if isinstance(m.get("tool_call_id"), str) else None
            if name:
                entry["tool_name"] = name
            out.append(entry)
        else:
            out.extend(flatten_history([m]))
    return out


def openai_calls(calls: list[dict]) -> list[dict]:
    """The model's tool calls in OpenAI's shape: an id each, arguments as a JSON string."""
    return [
        {
            "id": "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
        }
        for c in calls
    ]


def usage_of(counts: tuple[int, int] | None) -> dict | None:
    if counts is None:
        return None
    prompt, reply = counts
    return {"prompt_tokens": prompt, "completion_tokens": reply, "total_tokens": prompt + reply}


async def _whole_reply(send: Send, gone: Gone, step, first, cid: str, created: int, name: str) -> int:
    """A chat completion without `stream`: the reply gathered, then one JSON body. Returns the status sent."""
    parts: list[str] = []
    calls: list[dict] = []
    usage = None
    event = first
    try:
        while event is not None and not gone.is_set():
            if isinstance(event, Token):
                parts.append(event.text)
                calls += event.tool_calls or []
                usage = event.usage or usage
            event = await step()
    except ClairError as exc:
        status, obj = clair_error(exc)
        await send_json(send, status, obj)
        return status
    message: dict[str, Any] = {"role": "assistant", "content": "".join(parts)}
    if calls:
        message.update(content=message["content"] or None, tool_calls=openai_calls(calls))
    answer: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": name,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
    }
    if usage is not None:
        answer["usage"] = usage_of(usage)
    await send_json(send, 200, answer)
    return 200


def sse_chunk(cid: str, created: int, name: str, delta: dict, finish: str | None = None) -> bytes:
    """One streamed chat.completion.chunk, as OpenAI sends it (a server-sent event)."""
    obj = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": name,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _streamed_reply(send: Send, gone: Gone, step, first, cid: str, created: int, name: str, want_usage: bool) -> int:
    """A chat completion with `stream`: Server-Sent Events as the reply comes, then `data: [DONE]`. Returns the
    status to log (599: an error inside a stream that had begun)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")],
        }
    )
    chunk = functools.partial(sse_chunk, cid, created, name)

    async def out(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    await out(chunk({"role": "assistant", "content": ""}))
    event = first
    usage, called = None, False
    try:
        while event is not None and not gone.is_set():
            if isinstance(event, Waiting):
                note = f": waiting for the GPU: {event.reason} (position {event.position}, about {event.eta_s:.0f} s)"
                await out(note.replace("\n", " ").encode() + b"\n\n")
            else:
                if event.text:
                    await out(chunk({"content": event.text}))
                if event.tool_calls:
                    calls = [{"index": i, **c} for i, c in enumerate(openai_calls(event.tool_calls))]
                    await out(chunk({"tool_calls": calls}))
                    called = True
                usage = event.usage or usage
            event = await step()
    except ClairError as exc:
        # The stream has begun: the error goes in the stream, where OpenAI's client raises it.
        _, obj = clair_error(exc)
        await send({"type": "http.response.body", "body": b"data: " + json.dumps(obj).encode() + b"\n\n"})
        return 599
    await out(chunk({}, "tool_calls" if called else "stop"))
    if want_usage and usage is not None:  # OpenAI's last chunk: no choices, the usage
        last_chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name}
        last_chunk.update(choices=[], usage=usage_of(usage))
        await out(b"data: " + json.dumps(last_chunk).encode() + b"\n\n")
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    return 200


def in_process_refusal(tool_choice, tools, history) -> Response | None:
    """The in-process model cannot call tools: a request that needs a call, or a history holding calls or their
    results, is refused with what to do; plain tools offered are ignored (module docstring)."""
    if (tool_choice == "required" or isinstance(tool_choice, dict)) and tools:
        return error(
            400,
            "The in-process chat model cannot call tools, and `tool_choice` asks for a call. Tools need an "
            "Ollama model (start Ollama: chat uses it whenever it answers), or leave tool_choice out.",
            "tools_unsupported",
        )
    if any(m["role"] == "tool" or m.get("tool_calls") for m in history):
        return error(
            400,
            "The in-process chat model cannot read tool calls or tool results. Tools need an Ollama model "
            "(start Ollama: chat uses it whenever it answers), or send the conversation without them.",
            "tools_unsupported",
        )
    return None


@dataclass
class ChatAsk:
    """A chat completion request, checked: what Clair sends the engine."""

    model: str | None
    text: list[dict]  # the message to answer, flattened ([{"role": "user", "content": str}])
    history: list[dict]  # the messages before it, in Ollama's shape
    tools: list[dict] | None
    tool_choice: Any
    stream: bool
    want_usage: bool


def chat_request(body: dict, studio) -> ChatAsk | JSONResponse:
    """A /v1/chat/completions body, checked and translated (ChatAsk), or the 400 that says what is wrong."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return error(400, "`messages` must be a non-empty list of {role, content} objects.", "invalid_messages")
    last = messages[-1]
    if last.get("role") not in ("user", "tool"):
        return error(400, "The last message must be the user's (or a tool's result): Clair answers it.", "invalid_messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        return error(400, "`model` must be a string.", "invalid_model")
    if model == image_model_id(studio):
        return error(
            400,
            f"{model} is Clair's image model: it makes pictures (POST /v1/images/generations) and does not chat. "
            "Pick a chat model from GET /v1/models (those not owned by clair-image).",
            "model_not_for_chat",
        )
    # OpenAI's newer name for the system role.
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    if any(m.get("role") not in ("system", "user", "assistant", "tool") for m in messages):
        return error(400, "Clair takes system, user, assistant and tool messages only.", "invalid_messages")
    stream_options = body.get("stream_options")
    want_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    tool_choice = body.get("tool_choice")
    try:
        tools = openai_tools(body.get("tools"), tool_choice)
        if last.get("role") == "tool":  # the model answers a tool's result: no new message
            text, history = [{"role": "user", "content": ""}], ollama_messages(messages)
        else:
            text, history = flatten_history([last]), ollama_messages(messages[:-1])
    except (BadRequest, ValueError) as exc:
        return error(400, str(exc), "invalid_messages")
    if not text:
        return error(400, "The last message is empty.", "invalid_messages")
    return ChatAsk(model or None, text, history, tools, tool_choice, bool(body.get("stream")), want_usage)


class V1:
    """The /v1 routes over one Studio (`router` mounts them), and the images they issued.

    `issued`: images /v1 rendered, by file name -> the key's user (None without users): /v1/files serves
    these only, to the same user, until Clair restarts. Other people's images stay theirs."""

    def __init__(self, studio):
        self.studio = studio
        self.issued: OrderedDict[str, str | None] = OrderedDict()
        self.issued_lock = threading.Lock()

    async def take_slot(self, stack: contextlib.ExitStack, send: Send, user: str | None, address: str, gone: Gone, headers=None):
        """The front door's job, counted against its user's cap (clair.edge.guard.job_slot) and stopped when the
        client goes away; None (429 sent) past a cap."""
        try:
            job = stack.enter_context(job_slot(self.studio, user, address, headers))
        except GpuBusy as exc:
            await send_json(send, 429, error_body(OPENAI, 429, str(exc), "too_many_jobs"), {"retry-after": "5"})
            return None
        gone.link(job.stop)
        return job

    def models(self) -> Response:
        studio = self.studio
        created = int(time.time())
        backend, _ = studio.chat_backend()
        image_id = image_model_id(studio)
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": backend.name}
            for m in studio.chat_models()
            if m != image_id
        ]
        data.append({"id": image_id, "object": "model", "created": created, "owned_by": "clair-image"})
        return JSONResponse({"object": "list", "data": data})

    # -- chat ---------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        ask = chat_request(body, self.studio)
        if isinstance(ask, Response):
            return ask

        def engine() -> tuple[bool, str]:  # may ask Ollama (HTTP): not on the event loop
            backend, _ = self.studio.chat_backend()
            return backend.single_model, self.studio.default_chat_model()

        in_process, default = await in_thread(engine)
        refused = in_process_refusal(ask.tool_choice, ask.tools, ask.history) if in_process else None
        if refused is not None:
            return refused
        if in_process:
            # It answers as if no tools were offered (see the module docstring). A model name that is not one
            # of Clair's (OpenAI clients default to theirs) falls back to the default chat model, which is
            # the in-process engine's only one.
            ask.tools, ask.model = None, None
        client = client_name(request)
        user = request.scope.get("clair_api_user")
        name = (ask.model or default)[:80]
        cid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        address = request.client.host if request.client else "?"

        async def work(send: Send, gone: Gone) -> None:
            with contextlib.ExitStack() as stack:
                send = closing_send(send, stack)  # the slot goes back before the client sees the end
                job = await self.take_slot(stack, send, user, address, gone, request.headers)
                if job is None:
                    return
                await self._chat(send, gone, job, ask, name, cid, created, client)

        return Exchange(work, OPENAI)

    async def _chat(self, send, gone: Gone, job, ask: ChatAsk, name: str, cid: str, created: int, client: str) -> None:
        t0 = time.monotonic()
        # The front door: waiting for the GPU holds no thread; the reply streams from a worker thread.
        events = job.chat(
            ask.text[0]["content"], ask.history, model=ask.model, system="", label=f"api:{name} ({client})", tools=ask.tools
        )

        async def step():
            try:
                return await events.__anext__()
            except StopAsyncIteration:
                return None

        status = 200
        try:
            try:
                first = await step()
            except ClairError as exc:
                status, obj = clair_error(exc)
                if not isinstance(exc, Cancelled):
                    await send_json(send, status, obj)
                return
            if not ask.stream:
                status = await _whole_reply(send, gone, step, first, cid, created, name)
                return
            status = await _streamed_reply(send, gone, step, first, cid, created, name, ask.want_usage)
        finally:
            job.stop.set()  # stops the reply if it is still running
            await events.aclose()  # releases the lease (Studio.chat's finally, run in a worker thread)
            log.info(
                "api chat model=%r client=%s stream=%s status=%s s=%.3f", name, client, ask.stream, status, time.monotonic() - t0
            )

    # -- images -------------------------------------------------------------------------------------
    async def images(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        try:
            params, n, fmt = image_request(body, self.studio.cfg)
        except BadRequest as exc:
            return error(400, str(exc), "invalid_request")
        user = request.scope.get("clair_api_user")
        client = client_name(request)
        address = request.client.host if request.client else "?"

        async def work(send: Send, gone: Gone) -> None:
            data = []
            t0 = time.monotonic()
            with contextlib.ExitStack() as stack:
                send = closing_send(send, stack)  # the slot goes back before the client sees the end
                job = await self.take_slot(stack, send, user, address, gone, request.headers)
                if job is None:
                    return
                for i in range(n):
                    p = params if params.seed < 0 else RenderParams(**{**params.__dict__, "seed": params.seed + i})
                    try:
                        path, info = await job.render(p)  # the owner's galleries; the wait holds no thread
                    except Cancelled:
                        return
                    except ClairError as exc:
                        status, obj = clair_error(exc)
                        await send_json(send, status, obj)
                        return
                    data.append(self._image_item(request, path, info, fmt, user))
            log.info("api images n=%d client=%s s=%.3f", n, client, time.monotonic() - t0)
            await send_json(send, 200, {"created": int(time.time()), "data": data})

        return Exchange(work, OPENAI)

    def _image_item(self, request: Request, path, info: dict, fmt: str, user: str | None) -> dict[str, Any]:
        """One image of the answer: the PNG itself (b64_json), or a link only its user can open (url)."""
        item: dict[str, Any] = {"revised_prompt": info["prompt"]}
        if fmt == "b64_json":
            item["b64_json"] = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        else:
            with self.issued_lock:
                self.issued[Path(path).name] = user
                while len(self.issued) > MAX_ISSUED:
                    self.issued.popitem(last=False)
            item["url"] = str(request.base_url).rstrip("/") + "/v1/files/" + Path(path).name
        item["clair"] = {k: info[k] for k in ("seed", "steps", "guidance", "width", "height", "model")}
        return item

    def files(self, name: str, request: Request) -> Response:
        """A PNG this API rendered for the same user, from the output folder, by exact name; nothing else."""
        folder = Path(self.studio.image.output_dir).resolve()
        with self.issued_lock:
            known = name in self.issued and self.issued[name] == request.scope.get("clair_api_user")
        if not known or not FILE_NAME.match(name):
            return error(404, "No such image.", "not_found")
        try:
            entries = {e.name: e for e in folder.iterdir()}
        except OSError:
            return error(404, "No such image.", "not_found")
        entry = entries.get(name)
        if entry is None or entry.is_symlink() or not entry.is_file():
            return error(404, "No such image.", "not_found")
        return FileResponse(entry, media_type="image/png")


def router(studio) -> APIRouter:
    """The /v1 routes (class V1), under one APIRouter for the web port's app."""
    v1 = V1(studio)
    r = APIRouter(prefix="/v1")
    r.add_api_route("/models", v1.models, methods=["GET"])
    r.add_api_route("/chat/completions", v1.chat_completions, methods=["POST"])
    r.add_api_route("/images/generations", v1.images, methods=["POST"])
    r.add_api_route("/files/{name}", v1.files, methods=["GET"])
    return r


def sent(value: Any) -> str:
    """What a client sent, in words that do not repeat it: an answer never hands back what the client sent
    (a `size` of any length came back whole). A number or a constant is no text of the client's and is shown."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        shown = repr(value)
        return shown if len(shown) <= 24 else f"a number of {len(shown)} characters"
    if isinstance(value, str):
        return f"a text of {len(value)} characters"
    return "a JSON object" if isinstance(value, dict) else "a JSON list"


def image_request(body: dict, cfg) -> tuple[RenderParams, int, str]:
    """(params, n, response_format) from an images/generations body. Raises BadRequest."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("`prompt` is required: describe the image you want.")
    size = body.get("size") or "1024x1024"
    m = re.fullmatch(r"(\d{1,4})x(\d{1,4})", size) if isinstance(size, str) else None
    if not m:
        raise BadRequest(f"`size` must be WIDTHxHEIGHT, e.g. 1024x1024 (got {sent(size)}).")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise BadRequest(f"`n` must be from 1 to {MAX_IMAGES} (got {sent(n)}).")
    fmt = body.get("response_format") or "url"
    if fmt not in ("url", "b64_json"):
        raise BadRequest(f"`response_format` must be url or b64_json (got {sent(fmt)}).")

    def number(key: str, default, kind):
        value = body.get(key, default)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or (kind is int and int(value) != value)
        ):
            raise BadRequest(f"`{key}` must be a{'n integer' if kind is int else ' number'} (got {sent(value)}).")
        return kind(value)

    negative = body.get("negative_prompt") or ""
    if not isinstance(negative, str):
        raise BadRequest("`negative_prompt` must be a string.")
    params = RenderParams(
        prompt=prompt,
        negative_prompt=negative,
        steps=number("steps", 30, int),
        guidance=number("guidance", 7.0, float),
        width=int(m.group(1)),
        height=int(m.group(2)),
        seed=number("seed", -1, int),
    )
    checked = params.validated(cfg)  # the limits (CLAIR_MAX_SIDE, CLAIR_MAX_STEPS ...); raises BadRequest
    # A random seed (-1) is drawn by Studio.render, per image.
    return (checked if params.seed >= 0 else params), n, fmt
