"""One render's run on the GPU, from its grant to its release: the hooks the image engine calls between
denoising steps (a pause for a chat, an out-of-memory retry, the tail) and the record of what it cost.

`Studio._render` makes one per render: it validates, loads the weights to the host and asks for the GPU, and
this object carries what changes while the render runs, so each hook is a method with a name rather than a
closure over half a dozen variables:

* `lease` is the lease that holds the GPU *now*: a pause (`checkpoint`) hands the GPU over and carries on
  under a continuation (`Arbiter.pause`), and `first` stays the one that was granted first.
* `evicted`, `evict_s` and `paused_s` add up over the first grant and every continuation.
* `finish()` releases whichever lease holds the GPU, exactly once, and runs the recovery hooks of a tenant
  that left for the first grant and came back during a pause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from clair.arbiter import Arbiter, Lease
from clair.base.errors import ClairError
from clair.engines.image import RenderParams
from clair.service.events import Queued

if TYPE_CHECKING:
    from clair.service.studio import Studio

log = logging.getLogger("clair.service.studio")


class RenderRun:
    """The state and hooks of one render between its request for the GPU and its release."""

    def __init__(
        self,
        studio: Studio,
        arbiter: Arbiter,
        first: Lease,
        params: RenderParams,
        on_progress: Callable[[str, float], None],
        cancel: threading.Event,
    ):
        self.studio, self.arbiter, self.params = studio, arbiter, params
        self.on_progress, self.cancel = on_progress, cancel
        self.first = first
        self.lease = first  # the lease that holds the GPU now: a pause hands over to a continuation
        self.evicted: list[str] = []
        self.evict_s = 0.0
        self.paused_s = 0.0
        self.tail_at: float | None = None  # when the denoisers left and the render shrank to its decode

    def _add_evicted(self, names) -> None:
        self.evicted.extend(n for n in names if n not in self.evicted)

    # -- the grant --------------------------------------------------------------------------------
    def wait(self) -> Generator[Queued, None, None]:
        """Wait for the first grant (yielding `Queued` to the front door), then check the card (preflight)."""
        studio, first, params = self.studio, self.first, self.params
        for w in studio._wait(first, self.cancel.is_set):
            self.on_progress(w.describe(), 0.0)
            if isinstance(w, Queued):
                yield w  # the front door awaits the grant on its event loop
        self._add_evicted(first.evicted)
        self.evict_s += first.evict_s
        studio.image.after_grant(first)
        self._add_evicted(studio.preflight(first, studio.image.to_load(params.width, params.height)))
        self.on_progress("Rendering", 0.0)
        self.lease.progress(total=params.steps)  # the pace is measured from the first step on

    # -- the image engine's hooks ------------------------------------------------------------------
    def on_step(self, step: int, total: int) -> None:
        self.lease.progress(step, total)  # the watchdog's sign of life (see Studio.healthy), and the pace
        self.on_progress(f"Step {step}/{total}", step / total)

    def checkpoint(self, step: int, total: int) -> None:
        """Between two denoising steps: pause for a waiting chat when the arbiter says so."""
        why = self.arbiter.should_yield(self.lease)
        if not why:
            return
        studio, image = self.studio, self.studio.image
        t0 = time.monotonic()
        image.release_cache()  # before the chat is granted: it is planned beside our weights only
        self.lease = lease = self.arbiter.pause(self.lease, why)
        self.on_progress(f"Paused for a chat at step {step}/{total}", step / total)
        for w in studio._wait(lease, self.cancel.is_set):
            self.on_progress(f"Paused for a chat at step {step}/{total}: resumes in about {w.eta_s:.0f} s", step / total)
        # Ours again: whatever left for the chat (Ollama) left in the wait above; our weights come back if the
        # chat needed their room. The latents, scheduler and generator never left the render's call.
        studio.preflight(lease, image.to_load(self.params.width, self.params.height))  # before the weights return
        studio._note("restore", tenant=image.tenant, s=image.restore())
        self.paused_s += time.monotonic() - t0
        self.evict_s += lease.evict_s
        self._add_evicted(lease.evicted)
        image.after_grant(lease)
        lease.progress()
        self.on_progress(f"Resumed at step {step}/{total}", step / total)

    def on_oom(self) -> None:
        """Out of memory: every idle tenant leaves the GPU before the image engine retries."""
        self.on_progress("Out of GPU memory: freeing the GPU and retrying", 0.0)
        gone = self.arbiter.evict_idle(self.lease)
        self._add_evicted(gone)
        if gone:
            # As after any eviction: the memory comes back after the answer (Ollama's runner exits after
            # /api/ps empties), so the retry waits for it rather than fail the same way.
            need, idle = self.studio.image.footprint(self.params.width, self.params.height)
            try:
                self.studio._wait_free(max(0, need - idle))
            except ClairError as exc:
                log.warning("out-of-memory retry without waiting further: %s", exc)
        # The lease's record of what left for it: the engines' recovery hooks read it at release.
        self.lease.evicted = (*self.lease.evicted, *(n for n in gone if n not in self.lease.evicted))

    def tail(self, drop: Callable[[], float]) -> None:
        """The denoising loop is done; only the VAE decode remains (see Arbiter.shrink)."""
        studio, ollama = self.studio, self.studio.ollama
        evicted_chat = ollama.tenant in self.first.evicted or ollama.tenant in self.lease.evicted
        warm = evicted_chat and studio.cfg.warmup and ollama.on_this_gpu
        if not warm and not self.arbiter.count("chat"):
            return  # nobody needs the room: the weights stay for the next render (CLAIR_IMAGE_KEEP_ALIVE)
        t0 = time.monotonic()
        drop()
        need = studio.image.decode_footprint(self.params.width, self.params.height)
        self.arbiter.shrink(self.lease, need, idle=0)
        self.tail_at = time.time()
        studio._note("tail", tenant=studio.image.tenant, s=time.monotonic() - t0, need=need)
        if warm:
            # The chat model comes back now: beside the decode when both fit, else right after it.
            ollama.warm_after_render()

    def render(self):
        """The image engine's render with this run's hooks: (image, facts)."""
        return self.studio.image.render(
            self.params,
            on_step=self.on_step,
            cancelled=self.cancel.is_set,
            checkpoint=self.checkpoint,
            on_oom=self.on_oom,
            tail=self.tail,
        )

    # -- the end --------------------------------------------------------------------------------
    def finish(self) -> None:
        """Release whichever lease holds the GPU now, with every engine's hooks."""
        first, lease = self.first, self.lease
        self.studio._release(lease)
        for engine in self.studio.engines if lease is not first else ():
            if engine.tenant in first.evicted and engine.tenant not in lease.evicted:
                # It left for the first grant, came back for a chat the render paused for, and a later grant
                # did not evict it again: its recovery hook (Ollama's warm-up) looks at the first lease.
                engine.after_release(first)

    def info(self, facts: dict) -> dict:
        """What the render cost, for its caller (see Studio.render)."""
        first, lease = self.first, self.lease
        return {
            # Stamped by the arbiter: after the purge, and at release before anyone else was granted.
            "gpu_started_at": first.ready_at,
            "gpu_finished_at": lease.released_at,
            "wait_s": round(first.wait_s, 4),
            "evict_s": round(self.evict_s, 4),
            "render_s": round(facts["render_s"] - self.paused_s, 4),  # time spent rendering, pauses not included
            "evicted": self.evicted,
            "evict_reason": first.evict_reason,
            "peak_reserved_gb": round(facts["peak_reserved_gb"], 3),
            "preemptions": lease.pauses,
            "paused_s": round(self.paused_s, 4),
            # time.time() when the denoising loop ended and the render shrank to its decode (None: it kept its
            # weights, nobody needed the room). A chat may start beside the decode from then on.
            "tail_at": self.tail_at,
            # None, or how the render healed after running out of memory: "vae-tiling" or "cpu-offload".
            "fallback": facts.get("fallback"),
        }
