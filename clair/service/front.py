"""The front door: the one way every client asks Clair for GPU work, whichever door it came in by.

The Chat and Image tabs, Gradio's scripting API (`/chat`, `/imagine`, `/render`), the Ollama-compatible port
and `/v1` are adapters: each translates its request into a `Job` and the job's answers and errors into its
own protocol. `Studio.job(who, ...)` opens one, and the job owns, for every client alike:

* the caps: one of `who`'s CLAIR_MAX_JOBS_PER_USER slots and one of the house's CLAIR_MAX_QUEUE, taken when
  the job opens (GpuBusy with a retry time past a cap, before anything else happens) and given back when it
  closes, whatever happened;
* cancel: the job's `stop` flag, registered under `cancel_key` so that Stop/Cancel (`Studio.cancel(key)`)
  reach it; an adapter links its client's disconnect to the same flag;
* ownership: `owner` (the user) goes on the job's leases (the GPU panel) and on its images (galleries);
* the input limits and the lease: `chat()`, `imagine()`, `render()` and `hold()` run Studio's own checks
  (clair/service/limits.py) before any lease, then wait for the grant *on the event loop* (`Lease.waiting_async`):
  a waiting job is a future, not a thread. A worker thread is taken only for the work around the GPU (a
  load from disk, the render, the reply's stream) and for evictions;
* progress: `Waiting` events (place in the queue, estimate, reason) while held, then `Token`s; a render
  reports through `on_progress`;
* the give-back: every lease a job takes is released on every path (done, error, cancel, client gone).

A new client type costs an adapter, not a copy of these rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Generator
from typing import TYPE_CHECKING, Any

import anyio

from clair.base.errors import ClairError, GpuBusy
from clair.service.events import Queued, Token, Waiting

if TYPE_CHECKING:
    from clair.arbiter import Lease
    from clair.engines.base import Engine
    from clair.engines.image import RenderParams
    from clair.service.studio import Studio

log = logging.getLogger("clair.service.front")

# Worker threads for GPU work, apart from the server's and Gradio's own pools (one limiter per event loop).
# Jobs beyond it wait for a thread on the loop, holding none; a waiting job needs none at all.
GPU_THREADS = 64
_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _limiter() -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    lim = _limiters.get(loop)
    if lim is None:
        lim = _limiters[loop] = anyio.CapacityLimiter(GPU_THREADS)
    return lim


async def in_thread(fn: Callable, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args, limiter=_limiter())


class _Done:
    """A generator's return value, carried out of the worker thread (StopIteration cannot cross an await)."""

    def __init__(self, value: Any):
        self.value = value


def _step(gen: Generator, exc: BaseException | None = None) -> Any:
    try:
        return gen.throw(exc) if exc is not None else next(gen)
    except StopIteration as stop:
        return _Done(stop.value)


def _close(gen: Generator) -> None:
    try:
        gen.close()
    except Exception:
        log.exception("closing a job's generator failed")


class Job:
    """One client's GPU job; see the module docstring. Use `with studio.job(...) as job:`."""

    def __init__(self, studio: Studio, who: str, owner: str | None = None, cancel_key: str | None = None):
        self.studio = studio
        self.who = who
        self.owner = owner
        self.cancel_key = cancel_key
        self.stop = threading.Event()  # replaced by the cancel scope's flag when there is a cancel_key
        self._stack = contextlib.ExitStack()
        self._held: list[tuple[Engine, Lease | None]] = []

    # -- opening and closing: the caps and the cancel flag --------------------------------------------
    def __enter__(self) -> Job:
        jobs = self.studio.jobs
        which = jobs.try_take(self.who)
        if which is not None:
            raise GpuBusy(jobs.busy_message(which))
        self._stack.callback(jobs.give_back, self.who)
        if self.cancel_key:
            self.stop = self._stack.enter_context(self.studio.cancel_scope(self.cancel_key))
        return self

    def __exit__(self, *exc) -> None:
        """Releases what `hold()` took, then gives the slot back. After a `hold()` this runs the engines' hooks
        (I/O): an adapter on an event loop closes such a job in a worker thread (the gateway does)."""
        try:
            while self._held:
                engine, lease = self._held.pop()
                self.studio.after_hold(engine, lease)
        finally:
            self._stack.close()

    # -- the work ------------------------------------------------------------------------------------
    async def _drive(self, gen: Generator) -> AsyncGenerator[Any, None]:
        """Run a Studio generator: its steps in a worker thread, its waits for the GPU on the event loop.

        At a `Queued` event the generator is parked (it holds no thread) while the lease's grant is awaited;
        a refusal there (GpuBusy after CLAIR_QUEUE_TIMEOUT_S, Cancelled, a failed eviction) is thrown back
        into the generator, so it unwinds (releases) and reports exactly as a plain caller's would. The
        generator's return value ends up in `self.result`.
        """
        timeout = self.studio.cfg.queue_timeout_s
        try:
            ev = await in_thread(_step, gen)
            while not isinstance(ev, _Done):
                if not isinstance(ev, Queued):
                    yield ev
                    ev = await in_thread(_step, gen)
                    continue
                yield Waiting(ev.position, ev.eta_s, ev.reason)
                last = (ev.position, round(ev.eta_s), ev.reason)
                failed: BaseException | None = None
                try:
                    async with contextlib.aclosing(ev.lease.waiting_async(timeout, self.stop.is_set)) as places:
                        async for pos in places:
                            now = (pos["position"], round(pos["eta_s"]), pos["reason"])
                            if now != last:
                                last = now
                                yield Waiting(pos["position"], pos["eta_s"], pos["reason"])
                except ClairError as exc:
                    failed = exc
                ev = await in_thread(_step, gen, failed)
            self.result = ev.value
        finally:
            if gen.gi_frame is not None:  # left early (error, cancel, client gone): unwind it off the loop
                try:
                    with anyio.CancelScope(shield=True):
                        await in_thread(_close, gen)
                except BaseException:
                    threading.Thread(target=_close, args=(gen,), name="clair-cleanup", daemon=True).start()
                    raise

    def chat(
        self,
        message: str,
        history: list | None = None,
        model: str | None = None,
        system: str | None = None,
        label: str | None = None,
        tools: list | None = None,
    ) -> AsyncGenerator[Waiting | Token, None]:
        """A reply to `message`: `Waiting` while held back, then `Token`s (Studio.chat's checks and lease;
        `tools` and the last Token's usage and tool calls: see Studio.chat).

        The caller's `aclose()` (a client gone) reaches the generator itself: its lease is released then."""
        gen = self.studio.chat(message, history, model=model, system=system, stop=self.stop, label=label, owner=self.owner, tools=tools)
        return self._drive(gen)

    def imagine(self, idea: str, history: list | None = None, model: str | None = None) -> AsyncGenerator[Waiting | Token, None]:
        """Imagine: the chat model writes an SDXL prompt from `idea` (see Studio.imagine)."""
        return self._drive(self.studio.imagine(idea, history, model, stop=self.stop))

    async def imagine_prompt(self, idea: str, history: list | None = None, model: str | None = None) -> tuple[str, str]:
        """(prompt, negative prompt) for `idea`: imagine() to the end, parsed."""
        async with contextlib.aclosing(self.imagine(idea, history, model)) as events:
            reply = "".join([ev.text async for ev in events if isinstance(ev, Token)])
        return self.studio.imagined(reply, idea)

    async def render(
        self, params: RenderParams, on_progress: Callable[[str, float], None] = lambda text, frac: None
    ) -> tuple[str, dict]:
        """Render and save an image (Studio.render's checks, lease, pauses); returns (png path, info)."""
        gen = self.studio.render_steps(params, on_progress, self.stop, self.owner)
        async with contextlib.aclosing(self._drive(gen)) as waits:
            async for w in waits:
                on_progress(w.describe(), 0.0)
        return self.result

    async def hold(self, engine: Engine, model: str, label: str, gpu: bool = True) -> Lease | None:
        """Hold the GPU for a request the adapter sends to `engine` itself (the Ollama port relays it).

        A chat lease on the engine's tenant, labelled `label` in the queue, awaited on the loop like a
        chat's; released when the job closes, with the engine's hooks (it re-reads what it holds). `gpu=False`
        (an unload) takes no lease: the engine only re-reads its state when the job closes. An engine on
        another machine holds none of this GPU: nothing is held. Raises GpuBusy, Cancelled, EvictionFailed.
        """
        if not engine.on_this_gpu:
            return None
        if not gpu:
            self._held.append((engine, None))
            return None
        lease = await in_thread(self.studio.request_for, engine, model, label)
        lease.owner = self.owner
        self._held.append((engine, lease))
        await lease.wait_async(self.studio.cfg.queue_timeout_s, self.stop.is_set)
        lease.progress()
        await in_thread(engine.after_grant, lease, model)
        # As Studio.chat does: a model Ollama has not loaded yet is checked against the card first.
        await in_thread(self.studio.preflight, lease, engine.to_load(model))
        return lease
