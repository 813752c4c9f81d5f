"""The web edge's shared pieces, for every port and protocol (the guard is clair/edge/web.py's `Guard`):

* reading a request body within a cap while it arrives (chunked or not), and only while it keeps moving
  (past its first 2 MB, at a pace: `Pace`);
* JSON parsed off the event loop, its size in values bounded before the parser sees it and its nesting
  checked after;
* one error body per protocol: OpenAI's `{"error": {"message", "type", "code"}}` for /v1, Ollama's
  `{"error": "..."}` on the Ollama-compatible port, `{"detail": "..."}` (Gradio's and FastAPI's) elsewhere;
* `Exchange`, the response the API adapters (clair/adapters/gateway.py, clair/adapters/openai_api.py) answer with: it
  runs the request's work itself, so a job slot or a lease goes back whatever happens.

Neither adapter imports the other: both build on this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import Response

from clair.base.errors import GpuBusy
from clair.service.forwarded import busy_note, counted_as

log = logging.getLogger("clair.edge.guard")

OPENAI, OLLAMA, WEB = "openai", "ollama", "web"  # the error shapes
MAX_DEPTH = 64  # JSON nesting: a chat with list-form content and tool schemas nests about ten deep
BODY_IDLE_S = 10.0  # a body must keep moving: at most this long between two of its chunks
BODY_TOTAL_S = 120.0  # and all of it within this long (64 MiB at 4.5 Mbit/s)
# Past its first BODY_FREE bytes (the part the BodyBudget counts) a body must keep a pace: each further
# BODY_PACE_S x BODY_MIN_RATE bytes within BODY_PACE_S of the last such step. 512 KiB/s (4.2 Mbit/s) is the
# slowest link BODY_TOTAL_S already allows for (a phone on weak Wi-Fi, a VPN over a mobile uplink); a body
# that holds budget cannot crawl below it.
BODY_MIN_RATE = 2**19
BODY_PACE_S = 5.0

Send = Callable[[dict], Awaitable[None]]


# --- error bodies ---------------------------------------------------------------------------------


def error_body(protocol: str, status: int, message: str, code: str | None = None) -> dict:
    """The one error body of each protocol."""
    if protocol == OPENAI:
        kind = "rate_limit_error" if status == 429 else ("invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "code": code or None}}
    if protocol == OLLAMA:
        return {"error": message}
    return {"detail": message}


async def send_json(send: Send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(obj).encode()
    raw = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# --- bodies -----------------------------------------------------------------------------------------


class BodyRefused(Exception):
    """A body Clair will not read: `status` 413 (too large) or 408 (stopped moving)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


BODY_BUDGET = 256 * 2**20  # bytes of request bodies held at once, all requests on all ports together
BODY_FREE = 2 * 2**20  # each body's first bytes are not counted: a text request (<= 1.3 MB) is never refused
BUDGET_RETRY_S = 5


class BodyBudget:
    """The bytes of request bodies Clair holds in memory at once, over every request of every port.

    A body is held from its first byte until its request has been answered (it waits in the GPU's queue with
    it), so each cap per request (64 MB on the Ollama port) says nothing about their sum: sixteen 64 MB chats
    at once took the process to 1.8 GB. Each request's claim grows with the bytes that have arrived (never
    with what its Content-Length promises: a client that declares 64 MB and sends a byte every few seconds
    held a 64 MB claim for two minutes, and two keys kept a 20 MB image chat out for 45 s). A claim past the
    budget, or past the claimant's share of it (half: one key cannot keep everyone else's images out), is
    refused 503 with Retry-After; so is a Content-Length that would not `fit` now, before a byte is read.
    The claimant is the request's person on a GPU route (PerPerson's `who`), else its machine. A body's first
    BODY_FREE bytes are not counted, so large bodies (images in a chat) wait their turn but text requests (the
    connection caps bound those) always pass; past them a body must keep its pace (read_body), so holding
    the budget costs a client the bandwidth of the bytes it holds. Thread-safe: the two ports' servers may run
    on two event loops."""

    def __init__(self, total: int = BODY_BUDGET, share: int | None = None):
        self.total = total
        self.share = total // 2 if share is None else share  # the most one claimant may hold
        self.held = 0
        self.per: dict[str, int] = {}  # claimant -> bytes held
        self.peak = 0  # the most held at once (tests and the log read it)
        self.refused = 0
        self._lock = threading.Lock()

    def claim(self, who: str) -> BodyClaim:
        return BodyClaim(self, who)

    def _take(self, who: str, n: int) -> str | None:
        """Hold `n` more bytes for `who`: None, or which limit refused them ("share" or "total")."""
        with self._lock:
            mine = self.per.get(who, 0)
            why = "share" if mine + n > self.share else ("total" if self.held + n > self.total else None)
            if why is not None:
                self.refused += 1
                return why
            self.held += n
            self.per[who] = mine + n
            self.peak = max(self.peak, self.held)
            return None

    def fits(self, who: str, size: int) -> str | None:
        """Whether a body of `size` bytes in all would fit now beside what is held (None), else which limit
        would refuse it ("share" or "total"). Takes nothing: a Content-Length is a promise, not bytes."""
        n = max(0, size - BODY_FREE)
        with self._lock:
            if self.per.get(who, 0) + n > self.share:
                return "share"
            return "total" if self.held + n > self.total else None

    def _free(self, who: str, n: int) -> None:
        with self._lock:
            self.held -= n
            left = self.per.get(who, 0) - n
            if left > 0:
                self.per[who] = left
            else:
                self.per.pop(who, None)

    def refusal(self, why: str) -> BodyRefused:
        if why == "share":
            return BodyRefused(
                503,
                f"You are sending too many large requests at once (at most {self.share / 2**20:.0f} MB of them at a "
                f"time per person): try again in {BUDGET_RETRY_S} s, when one of them is done.",
            )
        return BodyRefused(
            503,
            f"Clair is reading too many large requests at once (at most {self.total / 2**20:.0f} MB of them "
            f"together): try again in {BUDGET_RETRY_S} s.",
        )


class BodyClaim:
    """One request's part of the BodyBudget: grown with the body's bytes as they arrive, given back once
    (close) when the request is over. `who` may be changed until it first grows (the guard learns the
    request's person after its headers)."""

    def __init__(self, budget: BodyBudget, who: str):
        self.budget = budget
        self.who = who
        self.size = 0
        self.why = ""  # what refused the last growth ("share" or "total")

    def grow(self, size: int) -> bool:
        """Hold a body of `size` bytes in all (False: no room, `why` says which limit; what was held stays)."""
        counted = max(0, size - BODY_FREE)
        if counted <= self.size:
            return True
        why = self.budget._take(self.who, counted - self.size)
        if why is not None:
            self.why = why
            return False
        self.size = counted
        return True

    def fits(self, size: int) -> bool:
        """Whether a body of `size` bytes would fit now (False: `why` says which limit); holds nothing."""
        why = self.budget.fits(self.who, size)
        self.why = why or self.why
        return why is None

    def refusal(self) -> BodyRefused:
        return self.budget.refusal(self.why)

    def close(self) -> None:
        size, self.size = self.size, 0
        if size:
            self.budget._free(self.who, size)


class PerPerson:
    """Requests in flight per person on a port's GPU routes, from before their body is read until the last
    bytes of their answer. The job slot (`job_slot` below) is taken only once a body has been read and
    parsed; counting here first refuses a person's excess before a byte of it is read, so one key cannot
    make Clair read and hold many 64 MB bodies only to refuse them afterwards. `who` is the cap counter's
    key (clair/service/forwarded.py); the cap is CLAIR_MAX_JOBS_PER_USER, the job slot's own."""

    def __init__(self, cap: int):
        self.cap = cap
        self.count: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, who: str) -> Callable[[], None] | None:
        """Count one more request of `who`: its `leave` (call it any number of times), or None at the cap."""
        with self._lock:
            n = self.count.get(who, 0)
            if n >= self.cap:
                return None
            self.count[who] = n + 1
        done = threading.Event()

        def leave() -> None:
            if not done.is_set():
                done.set()
                self._leave(who)

        return leave

    def _leave(self, who: str) -> None:
        with self._lock:
            n = self.count.get(who, 0) - 1
            if n <= 0:
                self.count.pop(who, None)
            else:
                self.count[who] = n


class Pace:
    """The pace a body keeps once it is past its first `free` bytes (the part the BodyBudget counts): each
    further `step` bytes (window_s x min_rate) must arrive within `window_s` of the previous step, or of the
    moment the body passed `free`. A body that declares a large size and then crawls (a byte every few
    seconds: the idle timeout alone lets it) is refused within `window_s`, so holding budget costs a
    client the bandwidth of the bytes it holds."""

    def __init__(self, min_rate: float, window_s: float, free: int = BODY_FREE):
        self.window_s = window_s
        self.step = max(1, int(min_rate * window_s))
        self.rate = min_rate
        self.free = free
        self.since: float | None = None  # when the current step began (None: still within the free part)
        self.base = 0  # the body's size then

    def wait_s(self, now: float, idle_s: float) -> float:
        """How long to wait for the next part: at most `idle_s`, and not past the current step's deadline."""
        if self.since is None:
            return idle_s
        return max(0.0, min(idle_s, self.since + self.window_s - now))

    def moved(self, size: int, now: float) -> bool:
        """The body has `size` bytes at `now`: False when its current step came too late."""
        if size <= self.free:
            return True
        if self.since is None:
            self.since, self.base = now, self.free
        if size - self.base >= self.step:
            late = now > self.since + self.window_s
            self.since, self.base = now, size
            return not late
        return now <= self.since + self.window_s

    def late(self, now: float) -> bool:
        """The current step's deadline has passed (checked when a wait for the next part ran out)."""
        return self.since is not None and now >= self.since + self.window_s

    def refusal(self) -> BodyRefused:
        return BodyRefused(
            408,
            f"The request body arrived too slowly: past its first {self.free / 2**20:.0f} MB, Clair reads a body "
            f"at {self.rate / 2**20:g} MB/s at least. Send it over a faster connection, or send smaller images.",
        )


async def read_body(
    receive,
    limit: int,
    idle_s: float = BODY_IDLE_S,
    total_s: float = BODY_TOTAL_S,
    claim: BodyClaim | None = None,
    pace: Pace | None = None,
) -> bytes | None:
    """The whole body, read as it arrives and refused the moment it passes `limit` (nothing past it is kept),
    the moment `claim` cannot grow to hold it (503: the BodyBudget is spent), or the moment it falls behind
    its `pace` (408; default: BODY_MIN_RATE over BODY_PACE_S). None when the client went away. Raises
    BodyRefused."""
    pace = Pace(BODY_MIN_RATE, BODY_PACE_S) if pace is None else pace
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(total_s) as whole:
        while True:
            with anyio.move_on_after(pace.wait_s(anyio.current_time(), idle_s)) as idle:
                message = await receive()
            if idle.cancelled_caught:
                if pace.late(anyio.current_time()):
                    raise pace.refusal()
                raise BodyRefused(408, f"The request body stopped arriving: Clair waits at most {idle_s:.0f} s for the next part.")
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyRefused(413, too_large(limit))
            if claim is not None and not claim.grow(size):
                raise claim.refusal()
            if not pace.moved(size, anyio.current_time()):
                raise pace.refusal()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    assert whole.cancelled_caught
    raise BodyRefused(408, f"The request body took too long: Clair reads one for at most {total_s:.0f} s.")


def too_large(limit: int) -> str:
    mib = limit / 2**20
    return f"Request too large: Clair takes at most {mib:.0f} MB here." if mib >= 10 or mib == int(mib) else (
        f"Request too large: Clair takes at most {mib:.1f} MB here."
    )


def replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then the client's own messages (a disconnect)."""
    sent = False

    async def again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


# --- JSON ---------------------------------------------------------------------------------------------


class BadJson(ValueError):
    """A body that is not JSON Clair reads; the message says what is wrong, never what was sent."""


MAX_VALUES = 250_000  # commas and colons in a body: what json.loads costs (about 50 ms at this many)


def nesting(obj: Any) -> int:
    """How deep a parsed JSON value nests (a scalar: 0). Iterative, in Python: in a worker thread it shares
    the interpreter with the event loop, where C code (json.loads) would hold it throughout."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in value if isinstance(v, (list, dict)))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number Python would read as infinity (`1e400`) is refused like the word Infinity: a float that
    overflows is no number a client meant, and `int(inf)` deep in a handler answered 500."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:40]} is too large a number")
    return value


def parse_json(raw: bytes, limit: int = MAX_DEPTH) -> Any:
    """`raw` as JSON (NaN and Infinity refused, as Go's decoder and so Ollama refuse them), nesting at most
    `limit` levels and holding at most MAX_VALUES values. Raises BadJson.

    json.loads is C code: in any thread it holds the interpreter until it is done, so what it is given is
    bounded first (a count of commas and colons, in C at memory speed); nesting deeper than the
    interpreter's recursion limit is refused by json.loads itself."""
    values = raw.count(b",") + raw.count(b":")
    if values > MAX_VALUES:
        raise BadJson(f"the JSON holds more than {MAX_VALUES} values")
    try:
        obj = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadJson(f"the JSON nests deeper than {limit} levels") from None
    except ValueError as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise BadJson(f"{message}{where}") from None
    if nesting(obj) > limit:
        raise BadJson(f"the JSON nests deeper than {limit} levels")
    return obj


async def parse_json_async(raw: bytes) -> Any:
    """parse_json in a worker thread: a large body never holds the event loop (other clients, /healthz)."""
    return await anyio.to_thread.run_sync(parse_json, raw)


PARSED = "clair.json"  # the scope key under which the guard leaves a request's parsed JSON body


async def json_of(request) -> Any:
    """The request's JSON body: as the guard parsed it, else parsed here (off the event loop); None when
    empty. Raises BadJson."""
    if PARSED in request.scope:
        return request.scope[PARSED]
    raw = await request.body()
    if not raw.strip():
        return None
    return await parse_json_async(raw)


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
    and Ollama answered). As soon as the client disconnects, also while nothing is being sent, `gone` is
    set and `work` is cancelled wherever it awaits: in the GPU's queue (the lease is withdrawn), waiting
    for Ollama's first byte (the request to Ollama is closed, so Ollama stops too), between two chunks.
    Its `finally` blocks release what it holds (shielded where that takes a thread). Work running in a
    worker thread cannot be cancelled: it sees `gone` (or an event linked to it) when it next looks. A
    bug in `work` is answered 500 in the adapter's error shape (`protocol`), with an id, never the
    exception.
    """

    def __init__(self, work: Callable[[Send, Gone], Awaitable[None]], protocol: str = OLLAMA):
        self.work = work
        self.protocol = protocol
        self.background = None
        self.status_code = 200
        self.raw_headers: list = []

    async def __call__(self, scope, receive, send) -> None:
        gone = Gone()
        working = anyio.CancelScope()
        started = finished = False

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not finished:  # (the server also reports a disconnect once the answer is complete)
                        working.cancel()
                    return

        async def guarded_send(message: dict) -> None:
            nonlocal started, finished
            if gone.is_set():
                raise OSError("the client went away")
            started = started or message["type"] == "http.response.start"
            # Set before the send: the server wakes `watch` with a disconnect as it completes the answer.
            finished = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                with working:
                    await self.work(guarded_send, gone)
            except OSError:
                gone.set()
            except Exception as exc:  # a bug: logged with an id; the client gets the id, not the exception
                from clair.service.limits import unexpected

                text = unexpected(log, exc, "an API request")
                if not started and not gone.is_set():
                    await send_json(send, 500, error_body(self.protocol, 500, text, "internal_error"))
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


@contextlib.contextmanager
def job_slot(studio, user: str | None, address: str, headers=None):
    """The front door's job (`Studio.job`) for one GPU request, counted against its user's cap for the block (`studio.jobs`, clair/service/limits.py: the
    caps the UI uses, CLAIR_MAX_JOBS_PER_USER and CLAIR_MAX_QUEUE). A key's requests count as its name's
    (`user:NAME`, as a logged-in browser's), anonymous loopback ones by address; a client trusted to name its
    people counts each apart (clair/service/forwarded.py, given the request's `headers`). Raises GpuBusy past a cap,
    saying whose requests were counted.
    """
    who, counted = counted_as(studio.cfg, user, address, headers)
    job = studio.job(who, owner=user)  # the front door (clair/service/front.py): yields the Job
    try:
        job.__enter__()
    except GpuBusy as exc:
        raise GpuBusy(busy_note(str(exc), counted)) from None
    try:
        yield job
    finally:
        job.__exit__(None, None, None)
