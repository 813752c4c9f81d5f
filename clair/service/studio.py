"""Wires the real objects together: config -> arbiter + chat engines + image engine.

`Studio` is what the UI and the scripting API call. Every GPU-heavy path goes through
`Studio.chat()` or `Studio.render()`, and both hold an arbiter lease around their GPU work, so the
traffic-cop protocol lives here in one place:

1. Intercept: a render asks for the GPU; chats already streaming finish first, new ones are held
   (they see their place and an estimated wait) and are not sent to Ollama meanwhile.
2. Purge: the lease's plan evicts what must go (Ollama: unload what it was seen holding plus the configured
   model, then poll /api/ps until a successful reading is empty, then free VRAM on CUDA; or refuse).
3. Render on the cleared GPU.
4. Recovery: at the render's tail (its denoising done) the UNet and text encoders leave the GPU, the lease
   shrinks to the VAE decode's peak, and the chat model is warmed again in the background (beside the decode
   when both fit); then release, and held chats go on.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import asdict

from clair.arbiter import Arbiter, Kind, Lease
from clair.base.config import Config, duration_s
from clair.base.errors import BadRequest, ChatUnavailable, ClairError
from clair.device import card as device
from clair.device import gpu
from clair.engines.base import Engine, StateFile
from clair.engines.chat import ChatBackend, OllamaChat
from clair.engines.image import RenderParams
from clair.engines.worker import start_engines
from clair.service import limits, several
from clair.service.events import Queued, Token, Waiting
from clair.service.front import Job
from clair.service.render_run import RenderRun

log = logging.getLogger("clair.service.studio")
GiB = 1024**3
# Our own CUDA context (~0.3-0.5 GiB, outside torch's allocator) is not "other programs": this much of the
# device's unexplained use is not counted as theirs (the budget's reserve covers it).
CONTEXT_ALLOWANCE = int(0.5 * GiB)


# Imagine's fixed instruction: the chat model turns the conversation's idea into an SDXL prompt.
IMAGINE_SYSTEM = (
    "You write prompts for the Stable Diffusion XL image model. From the idea you are given (and the "
    "conversation before it), write one image prompt: a comma-separated list of the subject, setting, style, "
    "lighting, camera and quality words, under 60 words. Then write a negative prompt: what the image must not "
    "show. Answer with exactly two lines and nothing else:\n"
    "PROMPT: <the prompt>\n"
    "NEGATIVE: <the negative prompt>"
)
DEFAULT_NEGATIVE = "blurry, low quality, deformed, watermark, text"
_LABEL = re.compile(
    r"^[\s>*_#`\-]*(?P<key>negative(?:[ _-]*prompt)?|prompt|positive(?:[ _-]*prompt)?)[\s*_`]*[:=\-]\s*(?P<rest>.*)$",
    re.IGNORECASE,
)


def _clean(text: str) -> str:
    text = " ".join(text.replace("**", "").replace("`", "").split())
    return text.strip(" \"'“”‘’")


def parse_imagined(reply: str, idea: str = "", limit: int = 2000) -> tuple[str, str]:
    """(prompt, negative prompt) from the chat model's answer to IMAGINE_SYSTEM.

    Robust to what models do: labels in any case, in bold or a list, on their own line with the text below,
    extra chatter around them. With no PROMPT label, the whole reply (less a NEGATIVE part) is the prompt; an
    empty reply falls back to the idea itself. The negative prompt defaults to DEFAULT_NEGATIVE. Both are
    plain text, cut to `limit` characters (CLAIR_MAX_PROMPT_CHARS).
    """
    found: dict[str, list[str]] = {}
    current: str | None = None
    loose: list[str] = []
    for line in (reply or "").splitlines():
        m = _LABEL.match(line)
        if m:
            current = "negative" if m["key"].lower().startswith("negative") else "prompt"
            found.setdefault(current, [])
            if m["rest"].strip():
                found[current].append(m["rest"])
        elif current is not None and line.strip():
            found[current].append(line)
        elif current is None:
            loose.append(line)
    prompt = _clean(" ".join(found.get("prompt", []))) or _clean(" ".join(loose)) or _clean(idea)
    negative = _clean(" ".join(found.get("negative", []))) or DEFAULT_NEGATIVE
    return prompt[:limit], negative[:limit]


def _reading_dict(r) -> dict | None:
    return None if r is None else {"total": r.total, "free": r.free, "reserved": r.reserved}


class Studio:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        # The device every memory question goes to (CUDA, or the simulated card of CLAIR_SIM_GPU_GB).
        # With CLAIR_WORKERS=on the image engine and the in-process chat model run in worker processes and this
        # process never touches CUDA (clair/engines/worker.py); the cards are then read through the workers.
        # Several cards (workers and CLAIR_SIM_GPU_GB=12,24): one arbiter per card, each with its own ledger
        # and budget; `_card` says which card plans each tenant (Ollama's from CLAIR_OLLAMA_GPUS, the image
        # model's wherever placement put its worker). One card: one arbiter, and every tenant on it.
        self.tenant_card: dict[str, int] = {}
        self.place_lock = threading.Lock()
        self.ollama_cards = several.ollama_cards(cfg)
        image, local = start_engines(cfg, several.first_image_card(cfg, self.ollama_cards))
        self.arbiters = [
            self._new_arbiter(i, gpu.budget_bytes(cfg.vram_budget_gb, cfg.vram_reserve_gb, card))
            for i, card in enumerate(device.cards()[: several.card_count(cfg)])
        ]
        self.state = StateFile(cfg.state_path)
        self.ollama = OllamaChat(cfg, self.state)
        self.local = local
        self.image = image
        if len(self.arbiters) > 1:
            self.tenant_card = {self.ollama.tenant: min(self.ollama_cards, default=0), self.image.tenant: image.index}
        # The arbiter of the chat's card: the one the panel, /metrics and the job counter show first.
        self.arbiter = self.arbiters[self.tenant_card.get(self.ollama.tenant, 0)]
        # Per-user and house caps on GPU jobs (CLAIR_MAX_JOBS_PER_USER, CLAIR_MAX_QUEUE), checked by the UI and
        # the APIs (clair/adapters/ui.py, clair/adapters/gateway.py, clair/adapters/openai_api.py) before a request asks for a lease.
        self.jobs = limits.JobCounter(cfg.max_jobs_per_user, cfg.max_queue, eta_s=self.arbiter.drain_eta_s)
        self.engines: list[Engine] = [self.ollama, self.local, self.image]
        for engine in self.engines:
            # An engine on another machine (Ollama elsewhere) holds none of our GPU: nothing to evict, no
            # request to hold back. The image model may move between cards: every card knows how to evict it.
            for arbiter in self.arbiters if engine.moves_between_cards else [self.arbiter_of(engine)]:
                if engine.on_this_gpu:
                    arbiter.add_tenant(engine.tenant, engine.evict)
            engine.attach(self.arbiter_of(engine))
        log.info("ollama %s the GPU: %s", "shares" if self.ollama.on_this_gpu else "does not share", self.ollama.locality)
        self._cancel: dict[str, set[threading.Event]] = {}  # key -> the stop flags of its running jobs
        self._cancel_lock = threading.Lock()
        self._backend_cache: tuple[float, ChatBackend, str | None] | None = None
        self._seen: dict[str, tuple[float, list[dict]]] = {}  # engine -> (when, what it said it holds)
        self.last_health_problem: str | None = None
        # What happened, for the panel (recoveries, errors, loads) and clair.service.metrics (every event).
        self.recent: deque[dict] = deque(maxlen=30)
        self.swaps: deque[dict] = deque(maxlen=20)  # model loads and weight restores with their seconds
        self._listeners: list[Callable[[str, dict], None]] = []
        self.image_keep_alive_s = duration_s(cfg.image_keep_alive)
        self._keepalive: threading.Thread | None = None
        self._keepalive_lock = threading.Lock()

    def _new_arbiter(self, index: int, budget: int) -> Arbiter:
        cfg = self.cfg
        return Arbiter(
            policy=cfg.gpu_policy,  # type: ignore[arg-type]
            budget_bytes=budget,
            chat_priority=cfg.chat_priority,  # type: ignore[arg-type]
            queue_timeout_s=cfg.queue_timeout_s,
            wait_free=lambda nbytes: self._wait_free(nbytes, index),
            preempt=cfg.preempt,  # type: ignore[arg-type]
            render_slice_s=cfg.render_slice_s,
            max_preemptions=cfg.max_preemptions,
        )

    def arbiter_of(self, engine: Engine) -> Arbiter:
        """The arbiter of the card `engine` runs on (the only one with one card)."""
        return self.arbiters[self.tenant_card.get(engine.tenant, 0)]

    def _wait_free(self, nbytes: int, index: int = 0) -> float:
        """After an eviction: wait until card `index` has `nbytes` free, counting what other programs hold
        (the ledger's "other" tenant) as memory that will not come (clair/device/gpu.py, wait_free)."""
        return gpu.wait_free(
            nbytes,
            self.cfg.evict_timeout_s,
            reserve_gb=self.cfg.vram_reserve_gb,
            others=lambda: self.arbiters[index].resident_bytes("other"),
            card=device.cards()[index],
        )

    # -- events (for clair.service.metrics and the panel) ---------------------------------------------------
    def on_event(self, fn: Callable[[str, dict], None]) -> None:
        """Subscribe to "chat", "render", "load", "restore", "tail", "recovery" and "error" events."""
        self._listeners.append(fn)

    def _note(self, event: str, keep: bool = False, **data) -> None:
        data["at"] = time.time()
        if event in ("load", "restore") and data.get("s"):
            self.swaps.append({"event": event, **data})
        if keep:
            self.recent.append({"event": event, **data})
        for fn in list(self._listeners):
            try:
                fn(event, data)
            except Exception:  # a broken listener must not break a chat or a render
                log.exception("studio listener failed")

    def _error(self, what: str, exc: BaseException) -> None:
        self._note("error", keep=True, what=what, kind=type(exc).__name__, text=str(exc)[:300])

    # -- the front door (clair/service/front.py): every client's GPU work goes through a Job ------------------
    def job(self, who: str, owner: str | None = None, cancel_key: str | None = None) -> Job:
        """`with studio.job(who, owner, cancel_key) as job:` takes `who`'s job slot (GpuBusy past a cap), and
        gives it back at the end; `job.chat()`, `job.render()` ... do the work (see clair/service/front.py)."""
        return Job(self, who, owner, cancel_key)

    def request_for(self, engine: Engine, model: str, label: str) -> Lease:
        """A chat lease on `engine`'s tenant for a request an adapter sends to the engine itself (Job.hold)."""
        return self._chat_request(engine, model, label)

    def after_hold(self, engine: Engine, lease: Lease | None) -> None:
        """Job.hold's end: release its lease (with every engine's hooks), or after an unload re-read the engine."""
        if lease is not None:
            self._release(lease)
        else:
            engine.sync(self.arbiter_of(engine))
        self._seen.clear()  # /status reads the engines afresh

    def imagined(self, reply: str, idea: str) -> tuple[str, str]:
        return parse_imagined(reply, idea, self.cfg.max_prompt_chars)

    # -- chat ----------------------------------------------------------------------------------------
    def chat_backend(self, fresh: bool = False, model: str | None = None) -> tuple[ChatBackend, str | None]:
        """The engine chat uses now, and its problem with `model` (default: the configured one).

        `auto` prefers Ollama whenever it answers and falls back to the in-process model, re-checking
        every few seconds, so starting (or stopping) Ollama takes effect without a restart.
        """
        mode = self.cfg.chat_backend
        if mode == "local":
            return self.local, self.local.problem()
        if mode == "ollama":
            return self.ollama, self.ollama.problem(model)
        now = time.monotonic()
        if not fresh and model is None and self._backend_cache and now - self._backend_cache[0] < 5:
            return self._backend_cache[1], self._backend_cache[2]
        problem = self.ollama.problem(model)
        if problem == self.ollama.unreachable():
            backend, problem = self.local, self.local.problem()
        else:
            backend = self.ollama
        if model is None:  # the cache answers for the default model only
            self._backend_cache = (now, backend, problem)
        return backend, problem

    def chat_models(self) -> list[str]:
        backend, _ = self.chat_backend()
        return backend.models()

    def default_chat_model(self) -> str:
        backend, _ = self.chat_backend()
        return backend.default_model()

    def chat(
        self,
        message: str,
        history: list | None = None,
        model: str | None = None,
        system: str | None = None,
        stop: threading.Event | None = None,
        label: str | None = None,
        owner: str | None = None,
        tools: list | None = None,
    ) -> Iterator[Waiting | Token]:
        """Stream a reply: `Waiting` events while held back, then `Token`s. Raises ClairError subclasses.

        The last Token may carry no text and the engine's counts and tool calls (see Token); `tools` (Ollama's
        shape) are offered to the model. A history that ends with a tool's result needs no `message`.

        `label` names the request in the queue (default `chat:<model>`; the gateway's `api:<model> (<client>)`).
        `owner` (the user, None without accounts) is shown in the GPU panel's queue.
        """
        try:
            yield from self._chat(message, history, model, system, stop, owner, label, tools)
        except ClairError as exc:
            self._error("chat", exc)
            raise

    def _chat(self, message, history, model, system, stop, owner=None, label=None, tools=None) -> Iterator[Waiting | Token]:
        # Limits first: a refused request makes no Ollama call and takes no lease (clair.service.limits).
        after_tool = bool(history) and isinstance(history[-1], dict) and history[-1].get("role") == "tool"
        message, messages, system, model = limits.check_chat(self.cfg, message, history, system, model, after_tool)
        system = self.cfg.system_prompt if system is None else system
        if system.strip() and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        if message.strip() or not after_tool:
            messages.append({"role": "user", "content": message})
        meta: dict = {}  # what the engine counted (usage) and the tools it called: the last Token carries them

        backend, problem = self.chat_backend(fresh=True, model=model)
        if problem and not backend.needs_load():  # an engine that loads answers with its load, below
            raise ChatUnavailable(problem)
        model = model or backend.default_model()
        if backend.needs_load():
            known = backend.blocked()  # a known load failure: answered at once, re-checked in the background
            if known:
                raise ChatUnavailable(known)
            yield Waiting(0, 0.0, f"Loading the in-process chat model ({model})")
            backend.load()  # from disk to host memory, before taking the GPU
        stop = stop or threading.Event()
        if not backend.on_this_gpu:
            t0, first, n = time.monotonic(), None, 0
            for text in backend.stream(model, messages, stop, tools=tools, meta=meta):
                if text:
                    first, n = first or time.monotonic(), n + 1
                yield Token(text)
            if meta:
                yield Token("", usage=meta.get("usage"), tool_calls=meta.get("tool_calls"))
            self._chat_done(backend.name, t0, first, n)
            return
        label = label or f"chat:{model}"
        lease = self._chat_request(backend, model, label)
        lease.owner = owner
        t0, first, n = None, None, 0
        try:
            yield from self._wait(lease, stop.is_set)
            t0 = time.monotonic()
            lease.progress(0)
            backend.after_grant(lease, model)
            self.preflight(lease, backend.to_load(model))  # Ollama would offload what the card lacks
            for text in backend.stream(model, messages, stop, tools=tools, meta=meta):
                if text:  # a chunk of the reply: counted as one token (Ollama streams about one per chunk)
                    first, n = first or time.monotonic(), n + 1
                    lease.progress(n)
                else:
                    lease.progress()  # the watchdog's sign of life (see healthy()); "" is a heartbeat
                if text:
                    yield Token(text)
            if meta:
                yield Token("", usage=meta.get("usage"), tool_calls=meta.get("tool_calls"))
        finally:
            self._release(lease)
        self._chat_done(backend.name, t0, first, n)

    def _chat_done(self, backend: str, t0: float | None, first: float | None, n: int) -> None:
        end = time.monotonic()
        ttft = (first - t0) if first and t0 else None
        # Tokens per second over the stream after the first token (the first one pays the prompt).
        tps = (n - 1) / (end - first) if first and n > 1 and end > first else None
        self._note("chat", backend=backend, ttft_s=ttft, tokens=n, tokens_per_s=tps)

    # -- leases: the same steps for every engine -------------------------------------------------------
    def sync(self) -> None:
        """Before a plan: every engine tells the ledger what it holds, and on CUDA what other programs hold."""
        for engine in self.engines:
            if engine.on_this_gpu:
                engine.sync(self.arbiter_of(engine))
        for index in range(len(self.arbiters)):
            self._sync_other(index)

    def _sync_other(self, index: int = 0) -> None:
        """GPU memory held by other processes on card `index`: the device's use less ours (torch's pool and
        our CUDA context, or the workers') and Ollama's (its last successful /api/ps). Counted in the ledger as
        a tenant that is never evicted, so the budget shrinks while they hold it. Skipped when Ollama's share
        is unknown."""
        arbiter = self.arbiters[index]
        outside = [self._share(e) for e in self.engines if e.on_this_gpu and self.arbiter_of(e) is arbiter]
        # One reading: free and our reserved figure from the same moment (a render allocating between two
        # separate reads would show up as another program's memory).
        now = device.cards()[index].reading()
        if now is None or None in outside:
            return
        other = now.others - sum(outside) - CONTEXT_ALLOWANCE  # type: ignore[arg-type]
        arbiter.set_other(max(0, other))

    def preflight(self, lease: Lease, grow: int) -> list[str]:
        """The ledger planned the grant; the card has the last word, before the first allocation.

        Memory can change hands between a plan and the work it granted: a program takes some after the last
        reading of "other programs" (a queued request is granted at another one's release, without a new
        reading), or a model Ollama still holds had not shown in a reading. When the card's free memory is
        short of `grow`, the bytes the work will still allocate: re-read who holds what, send every idle tenant
        away (as after an out-of-memory error, `Arbiter.evict_idle`), and wait for the memory. Returns the tenants that left. Without a device (or with room) it does nothing.
        With several cards: the lease's own card and arbiter."""
        arbiter = lease.arbiter
        card = device.cards()[self.arbiters.index(arbiter)] if arbiter in self.arbiters else gpu.dev()
        now = card.reading()
        if now is None or grow <= 0:
            return []
        self._note("preflight", label=lease.label, free=now.free, grow=grow)
        if now.free >= grow:  # (our cached blocks do not count: a render empties the cache as it starts)
            return []
        log.info(
            "card short before %s: free_gib=%.2f grow_gib=%.2f; re-reading and evicting idle tenants",
            lease.label,
            now.free / GiB,
            grow / GiB,
        )
        self.sync()
        gone = list(arbiter.evict_idle(lease))
        try:
            # All of it: a runner Ollama just unloaded gives its memory back a little after /api/ps empties,
            # and until then it reads like another program's (which `_wait_free` would not wait for). Memory
            # that never comes stops the wait once free memory has not risen for a while (gpu.wait_free).
            gpu.wait_free(grow, self.cfg.evict_timeout_s, reserve_gb=self.cfg.vram_reserve_gb, card=card)
        except ClairError as exc:
            log.warning("preflight: going ahead without waiting further: %s", exc)
        lease.evicted = (*lease.evicted, *(n for n in gone if n not in lease.evicted))
        return gone

    def _share(self, engine: Engine) -> int | None:
        """What `engine`'s other process holds on its card (None: unknown): the smaller of its last reading and
        the ledger, since a reading taken before Clair evicted it would hide as much of another program's memory
        (unknown is never free: count it as others')."""
        held = engine.held_outside()
        return None if held is None else min(held, self.arbiter_of(engine).resident_bytes(engine.tenant))

    def _request(self, engine: Engine, kind: Kind, footprint: tuple[int, int], label: str, steps: int = 0) -> Lease:
        self.sync()  # the ledger must see what is really on the GPU before it plans
        need, idle = footprint
        return self.arbiter_of(engine).request(kind, engine.tenant, need, idle, label=label, steps=steps)

    def _chat_request(self, engine: Engine, model: str, label: str) -> Lease:
        """A chat's lease, sized after the sync from one snapshot of what the engine holds (`Engine.sized`)."""
        self.sync()
        need, idle, parts, brings = engine.sized(model)
        return self.arbiter_of(engine).request("chat", engine.tenant, need, idle, label=label, parts=parts, brings=brings)

    def _release(self, lease: Lease) -> None:
        lease.release()
        for engine in self.engines:
            try:
                engine.after_release(lease)
            except Exception:  # a hook must not turn a finished request into a failure
                log.exception("after_release hook failed engine=%s", engine.name)

    def imagine(
        self,
        idea: str,
        history: list | None = None,
        model: str | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Waiting | Token]:
        """Imagine: the chat model turns `idea` (with the conversation before it) into an SDXL prompt.

        A chat like any other (limits, the arbiter's lease, Waiting events), with IMAGINE_SYSTEM as its
        system prompt. Stream it, join the tokens, and read them with parse_imagined().
        """
        idea = limits.check_message(idea, self.cfg, "idea")
        if not idea.strip():
            raise BadRequest("Describe the image first: type the idea, or chat about it and then press Imagine.")
        past = [m for m in limits.plain_history(history, self.cfg) if m["role"] != "system"]
        message = f"The idea: {idea.strip()}\n\nWrite the PROMPT and NEGATIVE lines now."
        yield from self.chat(message, past, model=model, system=IMAGINE_SYSTEM, stop=stop)

    def imagine_prompt(self, idea: str, history: list | None = None, model: str | None = None) -> tuple[str, str]:
        """(prompt, negative prompt) for `idea`: imagine() run to the end and parsed."""
        reply = "".join(e.text for e in self.imagine(idea, history, model) if isinstance(e, Token))
        return self.imagined(reply, idea)

    def _wait(self, lease: Lease, cancelled: Callable[[], bool]) -> Iterator[Waiting]:
        """Yield the lease's place in the queue whenever it changes, until the GPU is ours.

        A lease still in the queue first yields `Queued` (see there): the front door awaits the grant on its
        event loop before it pulls again, and then the wait below finds the GPU ours at once."""
        last = None
        pos = lease.position()
        if pos["position"]:
            last = (pos["position"], round(pos["eta_s"]), pos["reason"])
            yield Queued(pos["position"], pos["eta_s"], pos["reason"], lease)
        for pos in lease.waiting(self.cfg.queue_timeout_s, cancelled):
            now = (pos["position"], round(pos["eta_s"]), pos["reason"])
            if now != last:
                last = now
                yield Waiting(pos["position"], pos["eta_s"], pos["reason"])

    # -- render --------------------------------------------------------------------------------------
    def render(
        self,
        params: RenderParams,
        on_progress: Callable[[str, float], None] = lambda text, frac: None,
        cancel: threading.Event | None = None,
        owner: str | None = None,
    ) -> tuple[str, dict]:
        """Render and save an image through the arbiter. Returns (png path, info).

        `owner` (the user, None without accounts) is recorded in the PNG for per-user galleries.
        """
        steps = self.render_steps(params, on_progress, cancel, owner)
        try:
            while True:
                next(steps)  # a Queued event: the next step waits for the grant here
        except StopIteration as done:
            return done.value

    def render_steps(
        self,
        params: RenderParams,
        on_progress: Callable[[str, float], None] = lambda text, frac: None,
        cancel: threading.Event | None = None,
        owner: str | None = None,
    ) -> Generator[Queued, None, tuple[str, dict]]:
        """`render()` as a generator for the front door: it yields `Queued` where it is about to wait for the
        GPU and returns (png path, info)."""
        try:
            return (yield from self._render(params, on_progress, cancel, owner))
        except ClairError as exc:
            self._error("render", exc)
            raise
        finally:
            self._start_keepalive()

    def _render(self, params, on_progress, cancel, owner) -> Generator[Queued, None, tuple[str, dict]]:
        params = params.validated(self.cfg)
        self.check_fits(params)  # limits first: before any load, lease or eviction
        cancel = cancel or threading.Event()
        t_request = time.time()
        # Load from disk (to host memory) before asking for the GPU: a slow or failing load must not
        # hold the GPU or evict anyone. Raises ImageModelUnavailable with what to do.
        was_loaded = not self.image.needs_load()
        t_load = time.monotonic()
        self.image.load()
        if not was_loaded:
            self._note("load", model=self.image.label, s=time.monotonic() - t_load)
        footprint = self.image.footprint(params.width, params.height)
        with self.place_lock:  # its card and its request together: the next placement sees it queued there
            several.place_image(self, footprint[0])  # with several cards: the card it goes to (its worker moves)
            arbiter = self.arbiter_of(self.image)
            first = self._request(
                self.image, "render", footprint, f"render {params.width}x{params.height}", steps=params.steps
            )
        first.owner = owner
        run = RenderRun(self, arbiter, first, params, on_progress, cancel)
        try:
            yield from run.wait()
            image, facts = run.render()
        finally:
            run.finish()
        path = self.image.save(image, params, owner=owner)
        self._note("restore", tenant=self.image.tenant, s=facts.get("restore_s", 0.0))
        if facts.get("fallback"):
            self._note("recovery", keep=True, what="render", fallback=facts["fallback"], text=(
                f"a {params.width}x{params.height} render ran out of GPU memory and recovered with {facts['fallback']}"
            ))
        info = {**asdict(params), "model": self.image.model_id, "path": str(path), "requested_at": t_request}
        info.update(run.info(facts))
        self._note("render", render_s=info["render_s"], steps=params.steps, preemptions=info["preemptions"])
        log.info(
            "render done seed=%s size=%sx%s wait_s=%.3f evict_s=%.3f render_s=%.3f evicted=%s preemptions=%d paused_s=%.3f",
            params.seed,
            params.width,
            params.height,
            info["wait_s"],
            info["evict_s"],
            info["render_s"],
            ",".join(info["evicted"]) or "-",
            info["preemptions"],
            info["paused_s"],
        )
        return str(path), info

    # -- giving memory back: eject, the image keep-alive --------------------------------------------
    def ejectable(self) -> dict[str, str]:
        """Tenants an operator may unload by hand: tenant -> what to call it."""
        out = {self.image.tenant: "The image model", self.local.tenant: "The in-process chat model"}
        # Ollama's models, where Ollama shares this GPU; in the demo only while chat uses it (without Ollama the
        # demo has none of its models to offer).
        if self.ollama.on_this_gpu and (not self.cfg.demo or self.chat_backend()[0].tenant == self.ollama.tenant):
            out = {self.ollama.tenant: "Ollama's models", **out}
        return out

    def eject(self, tenant: str) -> str:
        """Unload an idle model from the GPU now. Returns what happened, in words (never raises for a busy one).

        Goes through the arbiter (Arbiter.evict_idle_tenant): a busy tenant, or one a request waits for, is
        left alone and the reason is returned; nothing can start on it while it leaves.
        """
        names = self.ejectable()
        if tenant not in names:
            raise BadRequest(f"Unknown model {tenant!r}: choose one of {', '.join(names)}.")
        engine = next(e for e in self.engines if e.tenant == tenant)
        arbiter = self.arbiter_of(engine)
        engine.sync(arbiter)  # an engine in another process (Ollama) says what it holds now
        if not arbiter.resident_bytes(tenant):
            return f"{names[tenant]}: not on the GPU."
        why = arbiter.evict_idle_tenant(tenant, why="eject")
        if why:
            return f"{names[tenant]}: stays on the GPU, {why}."
        engine.sync(arbiter)
        self._note("eject", keep=True, tenant=tenant, text=f"{names[tenant]}: unloaded by hand")
        return f"{names[tenant]}: left the GPU."

    def _start_keepalive(self) -> None:
        """After a render: start the thread that unloads the image model once it has idled long enough."""
        if self.image_keep_alive_s < 0:
            return  # kept forever
        with self._keepalive_lock:
            if self._keepalive is not None:
                return  # running (it clears itself under this lock before it ends)
            self._keepalive = threading.Thread(target=self._keepalive_loop, name="clair-image-keepalive", daemon=True)
            self._keepalive.start()

    def _keepalive_loop(self) -> None:
        """Unload the image model after CLAIR_IMAGE_KEEP_ALIVE without a render; exits once it is unloaded.

        The check and the eviction are one arbiter call (evict_idle_tenant with idle_for_s): it evicts only
        an image tenant that no request runs on or waits for, and that has been idle that long, so it cannot
        race a render: a render that arrives meanwhile waits for the eviction, then brings the weights back.
        """
        keep = self.image_keep_alive_s
        tick = min(5.0, max(0.05, keep / 4))
        tenant = self.image.tenant
        while True:
            time.sleep(tick)
            arbiter = self.arbiter_of(self.image)
            idle = arbiter.idle_s(tenant)
            if idle is None:
                with self._keepalive_lock:
                    if not arbiter.resident_bytes(tenant):
                        self._keepalive = None
                        return  # not on the GPU: the next render starts a new timer
                continue  # busy
            if idle < keep:
                continue
            why = arbiter.evict_idle_tenant(tenant, idle_for_s=keep, why="keep-alive")
            if not why:
                self._note(
                    "keep-alive", keep=True, tenant=tenant,
                    text=f"image model unloaded after {keep:g} s without a render (CLAIR_IMAGE_KEEP_ALIVE)",
                )

    def check_fits(self, params: RenderParams) -> None:
        """Refuse a render that could never fit the VRAM budget, even alone (0 = unknown: no refusal)."""
        budget = max(a.budget for a in self.arbiters)  # the largest card: the render may be placed there
        if not budget:
            return
        need, _ = self.image.footprint(params.width, params.height)
        if need <= budget:
            return
        gib = 1024**3
        fits = limits.largest_fitting(self.image.footprint, budget, params.width, params.height)
        tip = (
            f"The largest render of that shape that fits is {fits[0]}x{fits[1]}."
            if fits
            else "Not even 64x64 fits: raise CLAIR_VRAM_BUDGET_GB if the card has more memory."
        )
        raise BadRequest(
            f"A {params.width}x{params.height} render needs about {need / gib:.1f} GB of GPU memory, more than "
            f"Clair's VRAM budget of {budget / gib:.1f} GB even with nothing else loaded. {tip}"
        )

    def preload(self) -> None:
        """Load checkpoints from disk into host memory (never onto the GPU), so the first render or local
        chat does not wait for it. A failure is only logged here: the tab shows it, and use retries."""
        jobs = [("image", self.image.load)]
        if self.cfg.chat_backend == "local" or (self.cfg.chat_backend == "auto" and self.cfg.demo):
            jobs.append(("chat", self.local.load))
        for name, load in jobs:
            try:
                load()
            except ClairError as exc:  # the engine has logged why (clair/engines/loadgate.py keeps it for the tabs)
                log.debug("preload failed model=%s error=%s", name, exc)
            except Exception as exc:
                log.warning("preload failed model=%s error=%s", name, exc)

    # -- cancel, status ------------------------------------------------------------------------------
    @contextmanager
    def cancel_scope(self, key: str) -> Iterator[threading.Event]:
        """A stop flag for one job, registered under `key` (e.g. "chat:<session>") while the job runs.

        Each job gets its own flag, so a second job of the same session does not replace the first's (which
        then could no longer be stopped), and the flag is dropped when the job ends: nothing accumulates.
        `cancel(key)` sets the flags of every job under the key.
        """
        ev = threading.Event()
        with self._cancel_lock:
            self._cancel.setdefault(key, set()).add(ev)
        try:
            yield ev
        finally:
            with self._cancel_lock:
                jobs = self._cancel.get(key)
                if jobs is not None:
                    jobs.discard(ev)
                    if not jobs:
                        del self._cancel[key]

    def cancel(self, key: str) -> bool:
        """Stop every running job under `key`; False when there is none."""
        with self._cancel_lock:
            jobs = list(self._cancel.get(key, ()))
        for ev in jobs:
            ev.set()
        return bool(jobs)

    def running(self, key: str) -> bool:
        """Whether a job runs under `key` now (e.g. "render:<session>": the UI lights its Cancel button)."""
        with self._cancel_lock:
            return bool(self._cancel.get(key))

    def cancel_jobs(self) -> int:
        """How many jobs can be cancelled now (for tests and /status)."""
        with self._cancel_lock:
            return sum(len(v) for v in self._cancel.values())

    # -- what the engines hold by their own account (for /status) ----------------------------------------
    def engines_seen(self) -> list[dict]:
        """Every engine's `seen()` (Ollama: the models /api/ps lists, Clair's or not), read at most every 2 s
        (the UI polls /status). A failed reading shows the last known models (the engine has told the ledger
        to assume the worst: unknown is never empty)."""
        now = time.monotonic()
        out: list[dict] = []
        for engine in self.engines:
            if not engine.on_this_gpu:
                continue
            cached = self._seen.get(engine.name)
            if cached is not None and now - cached[0] < 2.0:
                out += cached[1]
                continue
            found = engine.seen(self.arbiter_of(engine))
            if found is None:
                out += cached[1] if cached is not None else []
                continue
            self._seen[engine.name] = (now, found)
            out += found
        return out

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict:
        ollama_models = self.engines_seen()  # the gateway (issue 10): models loaded behind Clair's back too
        st = self.arbiter.status()
        st["ollama_models"] = ollama_models
        backend, problem = self.chat_backend()
        st["chat"] = {"backend": backend.name, "model": self.default_chat_model(), "problem": problem}
        st["image"] = {"model": self.image.label, "problem": self.image.problem(), "vae": self.image.vae_status()}
        st["stats"]["oom_recoveries"] = self.image.oom_recoveries
        st["stats"]["oom_failures"] = self.image.oom_failures
        st["engines"] = [{"name": e.name, "tenant": e.tenant, "device": e.device} for e in self.engines]
        other = next((r for r in st["resident"] if r.get("other")), None)
        st["other_gb"] = other["gb"] if other else 0.0
        st["image_keep_alive_s"] = self.image_keep_alive_s
        st["worker_restarts"] = self.worker_restarts()
        st["cuda"] = gpu.present()  # a device reports memory (CUDA, or the simulated card)
        st["device"] = gpu.dev().name
        st["demo"] = self.cfg.demo
        if len(self.arbiters) > 1:
            st["cards"] = self.cards_status()
        return st

    def cards_status(self) -> list[dict]:
        """Each card's arbiter, for the panel's bars and /metrics' per-card labels (several cards only)."""
        out = []
        for i, (arbiter, card) in enumerate(zip(self.arbiters, device.cards()[: len(self.arbiters)], strict=True)):
            st = arbiter.status()
            out.append({
                "index": i,
                "name": card.name,
                "budget": arbiter.budget,
                "resident": st["resident"],
                "holders": st["holders"],
                "waiting": st["waiting"],
                "stats": st["stats"],
                "reading": _reading_dict(card.reading()),
            })
        return out

    def worker_restarts(self) -> dict[str, int]:
        """Worker restarts per card label, summed over the engines run by workers (empty without workers)."""
        out: dict[str, int] = {}
        for engine in self.engines:
            for card, n in engine.worker_restarts().items():
                out[card] = out.get(card, 0) + n
        return out

    def health_problem(self) -> str | None:
        """Why Clair cannot be trusted to serve (None when it can): the watchdog's check, via /healthz.

        * the arbiter's lock is stuck (a deadlock: nothing can be granted or released);
        * a GPU holder made no progress (no denoising step, no token, no eviction step) for CLAIR_STALL_S
          seconds: a hung render, CUDA call or Ollama stream. systemd then restarts Clair, which is the only
          way to get the GPU back from a hung CUDA call in this process. A holder run by a worker process
          (CLAIR_WORKERS=on) is not counted: its worker is killed and replaced instead;
        * workers keep dying (3 deaths in 5 minutes): restarting a worker has not helped.
        """
        if not all(a.responsive(timeout=5) for a in self.arbiters):
            return "the GPU arbiter's lock has been held for over 5 s"
        trouble = [t for t in (e.worker_trouble() for e in self.engines) if t]
        if trouble:
            return "; ".join(trouble)
        if self.cfg.stall_s > 0:
            healed = {e.tenant for e in self.engines if e.heals_stalls}  # their worker is killed and replaced
            stalled = [
                x for a in self.arbiters for x in a.stalled(self.cfg.stall_s) if x.get("tenant") not in healed
            ]
            if stalled:
                return "; ".join(
                    f"{x['label']} has held the GPU without progress for {x['silent_s']:.0f} s "
                    f"(CLAIR_STALL_S={self.cfg.stall_s:g})"
                    for x in stalled
                )
        return None

    def healthy(self) -> bool:
        """For the systemd watchdog: see health_problem(). A failure is logged with its reason, once."""
        problem = self.health_problem()
        if problem and re.sub(r"[\d.]+", "", problem) != re.sub(r"[\d.]+", "", self.last_health_problem or ""):
            log.error("unhealthy: %s", problem)
        elif not problem and self.last_health_problem:
            log.warning("healthy again")
        self.last_health_problem = problem
        return problem is None
