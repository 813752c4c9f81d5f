"""Wires the real objects together: config -> arbiter + chat engines + image engine.

`Studio` is what the UI and the scripting API call. Every GPU-heavy path goes through
`Studio.chat()` or `Studio.render()`, and both hold an arbiter lease around their GPU work, so the
traffic-cop protocol lives here in one place:

1. Intercept: a render asks for the GPU; chats already streaming finish first, new ones are held
   (they see their place and an estimated wait) and are not sent to Ollama meanwhile.
2. Purge: the lease's plan evicts what must go (Ollama: unload, then poll /api/ps until empty, then
   free VRAM on CUDA).
3. Render on the cleared GPU.
4. Recovery: release; held chats go on; the chat model is warmed again in the background.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from clair import gpu, limits
from clair.arbiter import Arbiter, Lease
from clair.chat import ChatBackend, LocalChat, OllamaChat
from clair.config import Config
from clair.errors import BadRequest, ChatUnavailable, ClairError
from clair.image import ImageEngine, RenderParams

log = logging.getLogger("clair.studio")


@dataclass
class Waiting:
    """A chat or render is queued for the GPU."""

    position: int
    eta_s: float
    reason: str


@dataclass
class Token:
    text: str


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


class Studio:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.arbiter = Arbiter(
            policy=cfg.gpu_policy,  # type: ignore[arg-type]
            budget_bytes=gpu.budget_bytes(cfg.vram_budget_gb, cfg.vram_reserve_gb),
            chat_priority=cfg.chat_priority,  # type: ignore[arg-type]
            queue_timeout_s=cfg.queue_timeout_s,
            wait_free=lambda n: gpu.wait_free(n, cfg.evict_timeout_s, reserve_gb=cfg.vram_reserve_gb),
            preempt=cfg.preempt,  # type: ignore[arg-type]
            render_slice_s=cfg.render_slice_s,
            max_preemptions=cfg.max_preemptions,
        )
        self.ollama = OllamaChat(cfg)
        self.local = LocalChat(cfg)
        self.image = ImageEngine(cfg)
        # Ollama on another machine holds none of our GPU: nothing to evict, no chat to hold back.
        self.ollama_local = cfg.ollama_on_this_gpu
        if self.ollama_local:
            self.arbiter.add_tenant(self.ollama.tenant, self.ollama.evict)
        self.arbiter.add_tenant(self.local.tenant, self.local.evict)
        self.arbiter.add_tenant(self.image.tenant, self.image.evict)
        self._cancel: dict[str, set[threading.Event]] = {}  # key -> the stop flags of its running jobs
        self._cancel_lock = threading.Lock()
        self._backend_cache: tuple[float, ChatBackend, str | None] | None = None
        self.warmups = 0
        self.last_health_problem: str | None = None

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
        return self.cfg.chat_model if backend is self.ollama else self.local.label

    def chat(
        self,
        message: str,
        history: list | None = None,
        model: str | None = None,
        system: str | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Waiting | Token]:
        """Stream a reply: `Waiting` events while held back, then `Token`s. Raises ClairError subclasses."""
        # Limits first: a refused request makes no Ollama call and takes no lease (clair.limits).
        message, messages, system, model = limits.check_chat(self.cfg, message, history, system, model)
        system = self.cfg.system_prompt if system is None else system
        if system.strip() and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        messages.append({"role": "user", "content": message})

        backend, problem = self.chat_backend(fresh=True, model=model)
        if problem and backend is not self.local:  # the local engine answers for itself, below
            raise ChatUnavailable(problem)
        model = model or (self.cfg.chat_model if backend is self.ollama else self.local.label)
        if backend is self.ollama:
            self._sync_ollama()
        if backend is self.local and not self.local.loaded:
            known = self.local.blocked()  # a known load failure: answered at once, re-checked in the background
            if known:
                raise ChatUnavailable(known)
            yield Waiting(0, 0.0, f"Loading the in-process chat model ({self.local.label})")
            self.local.load()  # from disk to host memory, before taking the GPU
        stop = stop or threading.Event()
        if backend is self.ollama and not self.ollama_local:
            for text in backend.stream(model, messages, stop):
                yield Token(text)
            return
        need, idle = backend.footprint(model)
        lease = self.arbiter.request("chat", backend.tenant, need, idle, label=f"chat:{model}")
        try:
            yield from self._wait(lease, stop.is_set)
            lease.progress()
            for text in backend.stream(model, messages, stop):
                lease.progress()  # the watchdog's sign of life (see healthy()); "" is a heartbeat without text
                if text:
                    yield Token(text)
        finally:
            lease.release()
            if backend is self.ollama:
                self._sync_ollama()

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
        return parse_imagined(reply, idea, self.cfg.max_prompt_chars)

    def _wait(self, lease: Lease, cancelled: Callable[[], bool]) -> Iterator[Waiting]:
        """Yield the lease's place in the queue whenever it changes, until the GPU is ours."""
        last = None
        for pos in lease.waiting(self.cfg.queue_timeout_s, cancelled):
            now = (pos["position"], round(pos["eta_s"]), pos["reason"])
            if now != last:
                last = now
                yield Waiting(pos["position"], pos["eta_s"], pos["reason"])

    def _sync_ollama(self) -> None:
        """Tell the ledger what Ollama really holds (size_vram from /api/ps)."""
        if not self.ollama_local:
            return
        read_at = time.monotonic()
        self.arbiter.set_resident(self.ollama.tenant, self.ollama.resident_bytes(), read_at=read_at)

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
        params = params.validated(self.cfg)
        self.check_fits(params)  # limits first: before any load, lease or eviction
        cancel = cancel or threading.Event()
        t_request = time.time()
        # Load from disk (to host memory) before asking for the GPU: a slow or failing load must not
        # hold the GPU or evict anyone. Raises ImageModelUnavailable with what to do.
        self.image.load()
        self._sync_ollama()  # the ledger must see what Ollama holds before it plans
        need, idle = self.image.footprint(params.width, params.height)
        first = self.arbiter.request(
            "render", self.image.tenant, need, idle, label=f"render {params.width}x{params.height}"
        )
        lease = first  # the lease that holds the GPU now: a pause hands over to a continuation
        ollama_evicted = False
        evicted: list[str] = []
        evict_s = 0.0
        paused_s = 0.0

        def checkpoint(step: int, total: int) -> None:
            """Between two denoising steps: pause for a waiting chat when the arbiter says so."""
            nonlocal lease, ollama_evicted, evict_s, paused_s
            why = self.arbiter.should_yield(lease)
            if not why:
                return
            t0 = time.monotonic()
            lease = self.arbiter.pause(lease, why)
            on_progress(f"Paused for a chat at step {step}/{total}", step / total)
            for w in self._wait(lease, cancel.is_set):
                on_progress(f"Paused for a chat at step {step}/{total}: resumes in about {w.eta_s:.0f} s", step / total)
            # Ours again: whatever left for the chat (Ollama) left in the wait above; our weights come back
            # if the chat needed their room. The latents, scheduler and generator never left this call.
            self.image.restore()
            paused_s += time.monotonic() - t0
            evict_s += lease.evict_s
            evicted.extend(n for n in lease.evicted if n not in evicted)
            ollama_evicted = ollama_evicted or self.ollama.tenant in lease.evicted
            on_progress(f"Resumed at step {step}/{total}", step / total)

        try:
            for w in self._wait(first, cancel.is_set):
                on_progress(f"Waiting for the GPU: {w.reason} (position {w.position}, about {w.eta_s:.0f} s)", 0.0)
            ollama_evicted = self.ollama.tenant in first.evicted
            evicted.extend(first.evicted)
            evict_s += first.evict_s
            on_progress("Rendering", 0.0)
            lease.progress()

            def on_step(step: int, total: int) -> None:
                lease.progress()  # the watchdog's sign of life (see healthy())
                on_progress(f"Step {step}/{total}", step / total)

            def on_oom() -> None:
                # Out of memory: every idle tenant leaves the GPU before the image engine retries.
                nonlocal ollama_evicted
                on_progress("Out of GPU memory: freeing the GPU and retrying", 0.0)
                gone = self.arbiter.evict_idle(lease)
                evicted.extend(n for n in gone if n not in evicted)
                ollama_evicted = ollama_evicted or self.ollama.tenant in gone

            image, facts = self.image.render(
                params, on_step=on_step, cancelled=cancel.is_set, checkpoint=checkpoint, on_oom=on_oom
            )
        finally:
            lease.release()
            if ollama_evicted and self.cfg.warmup:
                # Recovery: bring the chat model back in the background so the next message doesn't pay the load.
                threading.Thread(target=self._warm, name="clair-warmup", daemon=True).start()
        path = self.image.save(image, params, owner=owner)
        info = {
            **asdict(params),
            "model": self.image.model_id,
            "path": str(path),
            "requested_at": t_request,
            # Stamped by the arbiter: after the purge, and at release before anyone else was granted.
            "gpu_started_at": first.ready_at,
            "gpu_finished_at": lease.released_at,
            "wait_s": round(first.wait_s, 4),
            "evict_s": round(evict_s, 4),
            "render_s": round(facts["render_s"] - paused_s, 4),  # time spent rendering, pauses not included
            "evicted": evicted,
            "evict_reason": first.evict_reason,
            "peak_reserved_gb": round(facts["peak_reserved_gb"], 3),
            "preemptions": lease.pauses,
            "paused_s": round(paused_s, 4),
            # None, or how the render healed after running out of memory: "vae-tiling" or "cpu-offload".
            "fallback": facts.get("fallback"),
        }
        log.info(
            "render done seed=%s size=%sx%s wait_s=%.3f evict_s=%.3f render_s=%.3f evicted=%s preemptions=%d paused_s=%.3f",
            params.seed,
            params.width,
            params.height,
            first.wait_s,
            evict_s,
            facts["render_s"] - paused_s,
            ",".join(evicted) or "-",
            lease.pauses,
            paused_s,
        )
        return str(path), info

    def check_fits(self, params: RenderParams) -> None:
        """Refuse a render that could never fit the VRAM budget, even alone (0 = unknown: no refusal)."""
        budget = self.arbiter.budget
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

    def _warm(self) -> None:
        # A short grace period first: someone iterating on prompts renders again within seconds, and
        # reloading the LLM in between would only be evicted again (measured in bench/run.py).
        time.sleep(self.cfg.warmup_delay_s)
        if self.arbiter.count("render"):
            return  # another render is queued or running: it would evict the model again at once
        for model in self.ollama.last_evicted or [self.cfg.chat_model]:
            need, idle = self.ollama.footprint(model)
            lease = self.arbiter.request("chat", self.ollama.tenant, need, idle, label=f"warm-up:{model}")
            try:
                lease.wait(self.cfg.queue_timeout_s)
                t0 = time.monotonic()
                self.ollama.warm(model)
                self.warmups += 1
                log.info("warm-up done model=%s s=%.2f", model, time.monotonic() - t0)
            except Exception as exc:
                log.warning("warm-up failed model=%s error=%s", model, exc)
            finally:
                lease.release()
                self._sync_ollama()

    def preload(self) -> None:
        """Load checkpoints from disk into host memory (never onto the GPU), so the first render or local
        chat does not wait for it. A failure is only logged here: the tab shows it, and use retries."""
        jobs = [("image", self.image.load)]
        if self.cfg.chat_backend == "local" or (self.cfg.chat_backend == "auto" and self.cfg.demo):
            jobs.append(("chat", self.local.load))
        for name, load in jobs:
            try:
                load()
            except ClairError as exc:  # the engine has logged why (clair/loadgate.py keeps it for the tabs)
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

    def status(self) -> dict:
        st = self.arbiter.status()
        backend, problem = self.chat_backend()
        st["chat"] = {"backend": backend.name, "model": self.default_chat_model(), "problem": problem}
        st["image"] = {"model": self.image.label, "problem": self.image.problem(), "vae": self.image.vae_status()}
        st["stats"]["oom_recoveries"] = self.image.oom_recoveries
        st["stats"]["oom_failures"] = self.image.oom_failures
        st["cuda"] = gpu.cuda()
        st["demo"] = self.cfg.demo
        return st

    def health_problem(self) -> str | None:
        """Why Clair cannot be trusted to serve (None when it can): the watchdog's check, via /healthz.

        * the arbiter's lock is stuck (a deadlock: nothing can be granted or released);
        * a GPU holder made no progress (no denoising step, no token, no eviction step) for CLAIR_STALL_S
          seconds: a hung render, CUDA call or Ollama stream. systemd then restarts Clair, which is the only
          way to get the GPU back from a hung CUDA call.
        """
        acquired = self.arbiter._lock.acquire(timeout=5)
        if not acquired:
            return "the GPU arbiter's lock has been held for over 5 s"
        self.arbiter._lock.release()
        if self.cfg.stall_s > 0:
            stalled = self.arbiter.stalled(self.cfg.stall_s)
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
