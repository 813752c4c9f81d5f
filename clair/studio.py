"""Wires the real objects together: config -> arbiter + chat engines + image engine.

`Studio` is what the UI and the scripting API call. Every GPU-heavy path goes through
`Studio.chat()` or `Studio.render()`, and both hold an arbiter lease around their GPU work, so the
traffic-cop protocol lives here in one place:

1. Intercept: a render asks for the GPU; chats already streaming finish first, new ones are held
   (they see their place and an estimated wait) and are not sent to Ollama meanwhile.
2. Purge: the lease's plan evicts what must go (Ollama: unload what it was seen holding plus the configured
   model, then poll /api/ps until a successful reading is empty, then free VRAM on CUDA; or refuse).
3. Render on the cleared GPU.
4. Recovery: release; held chats go on; the chat model is warmed again in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from clair import gpu
from clair.arbiter import Arbiter, Kind, Lease
from clair.chat import ChatBackend, LocalChat, OllamaChat, flatten_history
from clair.config import Config
from clair.engines import Engine, StateFile
from clair.errors import BadRequest, ChatUnavailable
from clair.image import ImageEngine, RenderParams

log = logging.getLogger("clair.studio")
GiB = 1024**3
# Our own CUDA context (~0.3-0.5 GiB, outside torch's allocator) is not "other programs": this much of the
# device's unexplained use is not counted as theirs (the budget's reserve covers it).
CONTEXT_ALLOWANCE = int(0.5 * GiB)


@dataclass
class Waiting:
    """A chat or render is queued for the GPU."""

    position: int
    eta_s: float
    reason: str


@dataclass
class Token:
    text: str


class Studio:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.arbiter = Arbiter(
            policy=cfg.gpu_policy,  # type: ignore[arg-type]
            budget_bytes=gpu.budget_bytes(cfg.vram_budget_gb, cfg.vram_reserve_gb),
            chat_priority=cfg.chat_priority,  # type: ignore[arg-type]
            queue_timeout_s=cfg.queue_timeout_s,
            wait_free=lambda n: gpu.wait_free(n, cfg.evict_timeout_s, reserve_gb=cfg.vram_reserve_gb),
        )
        self.state = StateFile(cfg.state_path)
        self.ollama = OllamaChat(cfg, self.state)
        self.local = LocalChat(cfg)
        self.image = ImageEngine(cfg)
        self.engines: list[Engine] = [self.ollama, self.local, self.image]
        for engine in self.engines:
            # An engine on another machine (Ollama elsewhere) holds none of our GPU: nothing to evict, no
            # request to hold back.
            if engine.on_this_gpu:
                self.arbiter.add_tenant(engine.tenant, engine.evict)
            engine.attach(self.arbiter)
        log.info("ollama %s the GPU: %s", "shares" if self.ollama.on_this_gpu else "does not share", self.ollama.locality)
        self._cancel: dict[str, threading.Event] = {}
        self._cancel_lock = threading.Lock()
        self._backend_cache: tuple[float, ChatBackend, str | None] | None = None

    @property
    def ollama_local(self) -> bool:
        return self.ollama.on_this_gpu

    @property
    def warmups(self) -> int:
        return self.ollama.warmups

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
    ) -> Iterator[Waiting | Token]:
        """Stream a reply: `Waiting` events while held back, then `Token`s. Raises ClairError subclasses."""
        if not message or not message.strip():
            raise BadRequest("Type a message first.")
        try:
            messages = flatten_history(history)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        system = self.cfg.system_prompt if system is None else system
        if system.strip() and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        messages.append({"role": "user", "content": message})

        backend, problem = self.chat_backend(fresh=True, model=model)
        if problem:
            raise ChatUnavailable(problem)
        model = model or backend.default_model()
        if backend.needs_load():
            yield Waiting(0, 0.0, f"Loading the in-process chat model ({model})")
            backend.load()  # from disk to host memory, before taking the GPU
        stop = stop or threading.Event()
        if not backend.on_this_gpu:
            for text in backend.stream(model, messages, stop):
                yield Token(text)
            return
        lease = self._request(backend, "chat", backend.footprint(model), f"chat:{model}")
        try:
            yield from self._wait(lease, stop.is_set)
            backend.after_grant(lease, model)
            for text in backend.stream(model, messages, stop):
                yield Token(text)
        finally:
            self._release(lease)

    # -- leases: the same steps for every engine -------------------------------------------------------
    def sync(self) -> None:
        """Before a plan: every engine tells the ledger what it holds, and on CUDA what other programs hold."""
        for engine in self.engines:
            if engine.on_this_gpu:
                engine.sync(self.arbiter)
        self._sync_other()

    def _sync_other(self) -> None:
        """GPU memory held by other processes: the device's use less ours (torch's pool and our CUDA
        context) and Ollama's (its last successful /api/ps). Counted in the ledger as a tenant that is never
        evicted, so the budget shrinks while they hold it. Skipped when Ollama's share is unknown."""
        if not gpu.cuda():
            return
        total, free = gpu.total_bytes(), gpu.free_bytes()
        ollama = self.ollama.held_vram() if self.ollama.on_this_gpu else 0
        if total is None or free is None or ollama is None:
            return
        other = total - free - gpu.reserved_now() - ollama - CONTEXT_ALLOWANCE
        self.arbiter.set_other(max(0, other))

    def _request(self, engine: Engine, kind: Kind, footprint: tuple[int, int], label: str) -> Lease:
        self.sync()  # the ledger must see what is really on the GPU before it plans
        need, idle = footprint
        return self.arbiter.request(kind, engine.tenant, need, idle, label=label)

    def _release(self, lease: Lease) -> None:
        lease.release()
        for engine in self.engines:
            try:
                engine.after_release(lease)
            except Exception:  # a hook must not turn a finished request into a failure
                log.exception("after_release hook failed engine=%s", engine.name)

    def _wait(self, lease: Lease, cancelled: Callable[[], bool]) -> Iterator[Waiting]:
        """Yield the lease's place in the queue whenever it changes, until the GPU is ours."""
        last = None
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
    ) -> tuple[str, dict]:
        """Render and save an image through the arbiter. Returns (png path, info)."""
        params = params.validated()
        cancel = cancel or threading.Event()
        t_request = time.time()
        # Load from disk (to host memory) before asking for the GPU: a slow or failing load must not
        # hold the GPU or evict anyone. Raises ImageModelUnavailable with what to do.
        self.image.load()
        footprint = self.image.footprint(params.width, params.height)
        lease = self._request(self.image, "render", footprint, f"render {params.width}x{params.height}")
        try:
            for w in self._wait(lease, cancel.is_set):
                on_progress(f"Waiting for the GPU: {w.reason} (position {w.position}, about {w.eta_s:.0f} s)", 0.0)
            self.image.after_grant(lease)
            on_progress("Rendering", 0.0)
            image, facts = self.image.render(
                params,
                on_step=lambda step, total: on_progress(f"Step {step}/{total}", step / total),
                cancelled=cancel.is_set,
            )
        finally:
            # Recovery is the engines' business: Ollama warms its model again if this render evicted it.
            self._release(lease)
        path = self.image.save(image, params)
        info = {
            **asdict(params),
            "model": self.image.model_id,
            "path": str(path),
            "requested_at": t_request,
            # Stamped by the arbiter: after the purge, and at release before anyone else was granted.
            "gpu_started_at": lease.ready_at,
            "gpu_finished_at": lease.released_at,
            "wait_s": round(lease.wait_s, 4),
            "evict_s": round(lease.evict_s, 4),
            "render_s": round(facts["render_s"], 4),
            "evicted": list(lease.evicted),
            "evict_reason": lease.evict_reason,
            "peak_reserved_gb": round(facts["peak_reserved_gb"], 3),
        }
        log.info(
            "render done seed=%s size=%sx%s wait_s=%.3f evict_s=%.3f render_s=%.3f evicted=%s",
            params.seed,
            params.width,
            params.height,
            lease.wait_s,
            lease.evict_s,
            facts["render_s"],
            ",".join(lease.evicted) or "-",
        )
        return str(path), info

    def preload(self) -> None:
        """Load checkpoints from disk into host memory (never onto the GPU), so the first render or local
        chat does not wait for it. A failure is only logged here: the tab shows it, and use retries."""
        jobs = [("image", self.image.load)]
        if self.cfg.chat_backend == "local" or (self.cfg.chat_backend == "auto" and self.cfg.demo):
            jobs.append(("chat", self.local.load))
        for name, load in jobs:
            try:
                load()
            except Exception as exc:
                log.warning("preload failed model=%s error=%s", name, exc)

    # -- cancel, status ------------------------------------------------------------------------------
    def cancel_event(self, key: str) -> threading.Event:
        with self._cancel_lock:
            ev = threading.Event()
            self._cancel[key] = ev
            return ev

    def cancel(self, key: str) -> bool:
        with self._cancel_lock:
            ev = self._cancel.get(key)
        if ev is None:
            return False
        ev.set()
        return True

    def status(self) -> dict:
        st = self.arbiter.status()
        backend, problem = self.chat_backend()
        st["chat"] = {"backend": backend.name, "model": self.default_chat_model(), "problem": problem}
        st["image"] = {"model": self.image.label, "problem": self.image.problem()}
        st["engines"] = [{"name": e.name, "tenant": e.tenant, "device": e.device} for e in self.engines]
        other = next((r for r in st["resident"] if r.get("other")), None)
        st["other_gb"] = other["gb"] if other else 0.0
        st["cuda"] = gpu.cuda()
        st["demo"] = self.cfg.demo
        return st

    def healthy(self) -> bool:
        """For the systemd watchdog: the arbiter's lock is not stuck."""
        acquired = self.arbiter._lock.acquire(timeout=5)
        if acquired:
            self.arbiter._lock.release()
        return acquired
