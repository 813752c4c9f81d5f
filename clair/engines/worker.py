"""The image engine and the in-process chat model in worker processes (CLAIR_WORKERS=on): a CUDA fault costs
one render or one reply, not the service.

`WorkerImageEngine` is the web process's side. It is an `ImageEngine` to Studio, the arbiter and the
adapters (the same engine protocol, clair/engines/base.py), but every call that touches the GPU goes to a worker
process (clair/engines/worker_main.py) over a pipe of the standard library's `multiprocessing.connection`:
load, render with a round trip at every step (so the arbiter's checkpoint, pause and resume, cancel and the
render's tail run here, at the very step boundaries they run at in-process), evict/restore (the pinned swap stays
in the worker), save (the worker writes the PNG to the output folder and answers its path). What the footprint
needs (the weights' size, the VAE's kind, the learned size per megapixel) is mirrored from the worker's answers.

`WorkerCard` is the card as the web process sees it: memory readings come from the worker (the process that
holds the memory reads free and reserved together, over a second pipe served while a step computes). While no
worker answers, it is the card's own outside reading (the simulated card's file; unknown on CUDA), in which a
dead worker's memory counts as another program's until the card shows it freed.

The web process never initialises CUDA: the worker is spawned (not forked) and pins itself to its card first.

`WorkerLocalChat` does the same for the in-process chat model: `generate` streams each piece of text back as a
callback answered with whether to stop. `_Link` is what both share: the process's life, the pipes, the deaths.

Faults: a worker that exits (killed, a CUDA fault) or sends nothing for CLAIR_STALL_S while it holds a job is
killed (SIGKILL: a hung CUDA call ignores anything softer), reaped and started again at once (a thread per
worker waits for its exit); the job fails with `WorkerFailed` (`ChatWorkerFailed`), which says the image was
not saved (the rest of the reply is lost). `Deaths` counts deaths over a window: /healthz fails only
when workers keep dying (3 in 5 minutes), since then a fresh worker has not helped.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clair.base import errors
from clair.base.config import Config
from clair.base.errors import ChatUnavailable, ClairError, ImageModelUnavailable
from clair.device import card as device
from clair.engines.chat import LocalChat
from clair.engines.image import ImageEngine, RenderParams

log = logging.getLogger("clair.engines.worker")
START_TIMEOUT_S = 300.0  # importing torch and diffusers, and creating a CUDA context, on a slow disk
DEATHS_LIMIT = 3
DEATHS_WINDOW_S = 300.0


class WorkerFailed(ImageModelUnavailable):
    """The image worker died or stalled mid-job: the job is lost, the worker is started again."""


class ChatWorkerFailed(ChatUnavailable):
    """The chat worker died or stalled mid-reply: the reply is lost, the worker is started again."""


class Deaths:
    """Worker deaths over a sliding window; `too_many()` once `limit` fell within `window_s` (a pure clock)."""

    def __init__(self, limit: int = DEATHS_LIMIT, window_s: float = DEATHS_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._at: deque[float] = deque()
        self.total = 0

    def record(self) -> None:
        self._at.append(self.clock())
        self.total += 1

    def recent(self) -> int:
        now = self.clock()
        while self._at and now - self._at[0] > self.window_s:
            self._at.popleft()
        return len(self._at)

    def too_many(self) -> bool:
        return self.recent() >= self.limit


class _Dead(Exception):
    """The pipe says the worker is gone (or it was killed for a stall)."""


class Process:
    """One worker process (one generation): its pipes, its pid, and how it ended.

    Spawned as a fresh interpreter (`python -m clair.engines.worker_main`), never forked: CUDA does not survive a
    fork, and a fresh interpreter re-imports nothing of the web process's main script. Its environment pins it
    to its card before Python starts (`CUDA_VISIBLE_DEVICES`, or the simulated card's file); the two pipes'
    ends are passed as inherited descriptors; the settings are the first message."""

    def __init__(self, card: dict, cfg: Config, kind: str, learns: bool, generation: int):
        self.conn, child = multiprocessing.Pipe()
        self.probe, child_probe = multiprocessing.Pipe()
        self.generation = generation
        env = dict(os.environ)
        if card.get("sim_file"):
            env["CLAIR_SIM_GPU_FILE"] = card["sim_file"]
        elif card.get("cuda") is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(card["cuda"])
        root = str(Path(__file__).resolve().parents[2])  # where `clair` is importable from (a checkout, or site-packages)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        fds = (child.fileno(), child_probe.fileno())
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clair.engines.worker_main", str(fds[0]), str(fds[1])],
            env=env,
            pass_fds=fds,
        )
        child.close()
        child_probe.close()
        self.pid = self.proc.pid
        self.started_s = 0.0
        self.ready = threading.Event()
        self.probe_lock = threading.Lock()
        self.conn.send(("start", card, cfg, kind, learns))

    def await_hello(self, timeout: float) -> None:
        if self.ready.is_set():
            return
        if not self.conn.poll(timeout):
            raise _Dead(f"did not start within {timeout:.0f} s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            raise _Dead(self.ended()) from None
        if msg[0] != "hello":
            raise _Dead(f"started with {msg[0]!r}")
        self.started_s = time.monotonic() - self._t0
        self.ready.set()

    def ended(self) -> str:
        """How the process ended, in words."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # a hung CUDA call ignores anything softer
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log.error("worker pid=%s did not end after SIGKILL", self.pid)
        for c in (self.conn, self.probe):
            c.close()


class WorkerCard(device.Device):
    """The card as the web process sees it (see the module docstring). Allocation hooks go to `base`."""

    def __init__(self, base: device.Device, links: list[_Link], index: int = 0):
        self.base = base
        self.links = links
        self.index = index
        self.name = f"{base.name} (worker)" if base.present else "worker's card"

    @property
    def present(self) -> bool:  # type: ignore[override]
        return self.base.present or any(link.last_reading is not None for link in self.links)

    def reading(self) -> device.Reading | None:
        """The first answering worker's reading of this card, with the other workers' own memory on it added
        to "ours" (each worker's figure changes only during its own job). None answering: the outside reading."""
        found = [r for r in (link.read() for link in self.links if link.index == self.index) if r is not None]
        if found:
            r = found[0]
            reserved = sum(x.reserved for x in found) + self.base.reserved()
            return device.Reading(r.total, r.free, reserved, sum(x.allocated for x in found) + self.base.allocated())
        return self.base.reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def reserved(self) -> int:
        return self.base.reserved()

    def allocated(self) -> int:
        return self.base.allocated()

    def empty_cache(self) -> None:
        self.base.empty_cache()

    def hold(self, key: str, nbytes: int) -> None:
        self.base.hold(key, nbytes)

    def drop(self, key: str) -> None:
        self.base.drop(key)

    def transient(self, nbytes: int, slack: int = 0, first_use: str = ""):
        return self.base.transient(nbytes, slack, first_use)

    def declared_bytes(self, module) -> int | None:
        return self.base.declared_bytes(module)


class _Weights:
    """The worker's weights as ImageEngine's footprint and `to_load` look at them (`self._swap.nbytes`, `.on_gpu`)."""

    def __init__(self, nbytes: int, on_gpu: bool = True):
        self.nbytes = nbytes
        self.on_gpu = on_gpu


class _Image:
    """A rendered image that stays in the worker until `save` (no pixels cross the pipe)."""

    def __init__(self, generation: int):
        self.generation = generation


class _Link:
    """A worker process behind an engine: its life (start, death, restart, move), the job pipe's exchanges and
    the probe's readings. Mixed into the engine it runs (`WorkerImageEngine`, `WorkerLocalChat`)."""

    kind = ""  # what the worker runs: "image" or "chat" (clair/engines/worker_main.py)
    what = "worker"  # in messages: "the image worker on card 0 ..."
    failed: type[ClairError] = WorkerFailed  # what a job that died with its worker raises
    unavailable: type[ClairError] = ImageModelUnavailable  # an error of the worker's engine of no known kind
    learns = True
    cfg: Config

    def _link(self, index: int, cards: list[dict] | None, start: bool = True) -> None:
        # Every card the worker may run on: {"index", "sim_file", "sim_gb", "cuda"} (see `card_specs`).
        self.cards = cards or card_specs(self.cfg)
        self.index = index
        self._card = self.cards[index]
        self._restarts: dict[str, int] = {}
        self._conn_lock = threading.Lock()  # one exchange (a command and its answer) on the job pipe at a time
        self._life = threading.Lock()  # starting and killing
        self.deaths = Deaths()
        self.restarts = 0
        self.last_reading: device.Reading | None = None
        self.closed = False
        self._proc: Process | None = None
        self._generation = 0
        self._busy = False  # a job (a render, a reply) is in the worker: every silence past CLAIR_STALL_S is a stall
        if start:
            self._start()  # else at the first command (`_ready`)

    def _fresh(self) -> None:
        """A new worker holds no model: forget what the last one had loaded."""

    # -- the process's life ------------------------------------------------------------------------
    def _start(self) -> None:
        self._generation += 1
        proc = self._proc = Process(self._card, self.cfg, self.kind, self.learns, self._generation)
        self._fresh()
        # A worker that dies between jobs is replaced at once, and reaped (its memory is the card's again).
        threading.Thread(target=self._watch, args=(proc,), name=f"clair-{self.kind}-watch", daemon=True).start()
        log.info("%s started card=%s pid=%s generation=%d", self.what, self.index, self._proc.pid, self._generation)

    def _watch(self, proc: Process) -> None:
        """Wait for `proc` to end; unless it was ended on purpose (a restart, a move, close), it died."""
        proc.proc.wait()
        self._died(proc, f"the {self.what} on card {self.index} {proc.ended()}")

    def startup_s(self) -> float:
        """Seconds the current worker took from spawn to ready (waits for it)."""
        proc = self._ready()
        return proc.started_s

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _ready(self) -> Process:
        with self._life:
            if self.closed:
                raise self.failed(f"The {self.what} has been stopped.")
            if self._proc is None:
                self._start()
            proc = self._proc
            assert proc is not None
        try:
            proc.await_hello(START_TIMEOUT_S)
        except _Dead as exc:
            self._died(proc, f"the {self.what} on card {self.index} {exc}")
            raise self.failed(f"The {self.what} on card {self.index} {exc}. It is being started again: try again.") from None
        return proc

    def _died(self, proc: Process, why: str) -> None:
        """Kill what is left of `proc`, count the death and start the next generation (once per death)."""
        with self._life:
            if self._proc is not proc or self.closed:
                return
            proc.kill()
            self.last_reading = None
            self.deaths.record()
            self.restarts += 1
            label = str(self.index)
            self._restarts[label] = self._restarts.get(label, 0) + 1
            log.error("%s; starting it again (restart %d)", why, self.restarts)
            self._start()

    def move_to(self, index: int) -> None:
        """Run on card `index` from now on: the worker there starts afresh (one copy of the model: the old
        worker, and its memory on the old card, go). Only between jobs (Studio places renders one at a time)."""
        with self._life:
            if index == self.index or self.closed:
                return
            old, self._proc = self._proc, None
            self.index, self._card = index, self.cards[index]
            self.last_reading = None
            if old is not None:
                old.kill()
            self._start()
        log.info("%s moved to card %d", self.what, index)

    def close(self) -> None:
        with self._life:
            self.closed = True
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()

    # -- the job pipe ------------------------------------------------------------------------------
    def _recv(self, proc: Process, patient: bool = False) -> tuple:
        """The worker's next message. Silence past CLAIR_STALL_S kills it, except while it loads a model
        outside a job (`patient`: a first download from the hub may take many minutes, as in-process)."""
        stall = self.cfg.stall_s if self.cfg.stall_s > 0 and (self._busy or not patient) else None
        try:
            if not proc.conn.poll(stall):
                raise _Dead(f"sent nothing for {stall:g} s (CLAIR_STALL_S) and was killed")
            return proc.conn.recv()
        except (EOFError, OSError):
            raise _Dead(proc.ended()) from None
        except (TypeError, ValueError):
            # Another thread found the worker dead and closed this pipe under us (Process.kill): multiprocessing
            # then reads from a handle of None. Seen in CI as a TypeError where a killed worker should fail one reply.
            if proc.conn.closed:
                raise _Dead(proc.ended()) from None
            raise

    def _exchange(self, proc: Process, msg: tuple) -> tuple:
        with self._conn_lock:
            try:
                proc.conn.send(msg)
            except (EOFError, OSError):
                raise _Dead(proc.ended()) from None
            except (TypeError, ValueError):
                if proc.conn.closed:  # closed under us by the death handler (see _recv)
                    raise _Dead(proc.ended()) from None
                raise
            return self._recv(proc, patient=msg[0] == "load")

    def ping(self) -> None:
        """One round trip on the job pipe (the worker answers between jobs, or at a step boundary)."""
        self._call("ping")

    def _answer(self, reply: tuple) -> Any:
        if reply[0] == "ok":
            if reply[2] is not None:
                self._mirror(reply[2])
            return reply[1]
        kind, text = reply[1], reply[2]
        cls = getattr(errors, kind, None)
        if isinstance(cls, type) and issubclass(cls, errors.ClairError):
            raise cls(text)
        raise self.unavailable(text)

    def _load_in_worker(self, label: str) -> int:
        """Load the engine's model in the worker; returns the worker generation it is loaded in. A failure the
        worker's engine reported goes to the load gate as in-process (`label` names the model there); the
        worker's death does not (it is started again, and the next load is tried at once)."""
        try:
            self._call("load")
        except self.unavailable as exc:
            if not isinstance(exc, self.failed):
                self.gate.failed_loading(str(exc), exc, label, self.model_id, log)
            raise
        self.gate.succeeded()
        return self._generation

    def _call(self, *msg) -> Any:
        """One command to the worker, answered (raises the worker's error, or `failed` if it died)."""
        proc = self._ready()
        try:
            return self._answer(self._exchange(proc, msg))
        except _Dead as exc:
            self._died(proc, f"the {self.what} on card {self.index} {exc}")
            raise self.failed(
                f"The {self.what} on card {self.index} {exc} during {msg[0]}. It is being started again: try again."
            ) from None

    def _mirror(self, m: dict) -> None:
        """Keep what the worker's engine said about itself (its sizes) for the footprint."""
        if m.get("weights") is not None:
            self._swap = _Weights(int(m["weights"]), bool(m.get("on_gpu", True)))  # type: ignore[assignment]

    heals_stalls = True

    def sync(self, arbiter) -> None:  # type: ignore[override]
        """A worker that died took its models with it: the ledger drops them now, and the card's reading
        (WorkerCard) counts whatever the dead process still held as another program's until the card frees it."""
        if self.needs_load() and arbiter.resident_bytes(self.tenant):
            arbiter.set_resident(self.tenant, 0)

    def worker_trouble(self) -> str | None:
        n = self.deaths.recent()
        if n < self.deaths.limit:
            return None
        return (
            f"the {self.what} on card {self.index} died {n} times in {self.deaths.window_s / 60:g} minutes: "
            "restarting it has not helped"
        )

    def worker_restarts(self) -> dict[str, int]:
        return {str(c["index"]): self._restarts.get(str(c["index"]), 0) for c in self.cards}

    def read(self) -> device.Reading | None:
        """The card's memory as the worker reads it (None while no worker answers)."""
        proc = self._proc
        if proc is None or not proc.ready.is_set():
            return None
        try:
            with proc.probe_lock:
                proc.probe.send(("read",))
                if not proc.probe.poll(5.0):
                    return None
                _, r = proc.probe.recv()
        except (EOFError, OSError):
            return None
        self.last_reading = None if r is None else device.Reading(*r)
        return self.last_reading

    def _run(self, proc: Process, msg: tuple, calls: dict, cancelled) -> Any:
        """Send `msg` and serve the worker's callbacks until its answer."""
        self._busy = True
        try:
            reply = self._exchange(proc, msg)
            while reply[0] == "cb":
                try:
                    calls[reply[1]](*reply[2:])
                except Exception as exc:  # stop the render in the worker too, then raise this very error here
                    kind = type(exc).__name__ if isinstance(exc, errors.ClairError) else "fault"
                    self._answer_raise(proc, kind, str(exc))
                    raise
                reply = self._exchange(proc, ("ret", cancelled()))
        finally:
            self._busy = False
        return self._answer(reply)

    def _answer_raise(self, proc: Process, kind: str, text: str) -> None:
        try:
            reply = self._exchange(proc, ("raise", kind, text))
            while reply[0] == "cb":  # a callback already on its way: stop there too
                reply = self._exchange(proc, ("raise", kind, text))
        except _Dead as exc:
            self._died(proc, f"the {self.what} on card {self.index} {exc}")


class WorkerImageEngine(_Link, ImageEngine):
    """The image engine, run by a worker process on card `index` (see the module docstring)."""

    kind = "image"
    what = "image worker"
    moves_between_cards = True

    def __init__(self, cfg: Config, index: int = 0, cards: list[dict] | None = None):
        ImageEngine.__init__(self, cfg)
        self._link(index, cards)

    def _fresh(self) -> None:
        self._pipe = None  # the pipeline lives in the worker: a fresh one has none loaded
        self._swap = None

    def _mirror(self, m: dict) -> None:
        super()._mirror(m)
        self.vae_kind, self.vae_source, self.vae_note = m["vae_kind"], m["vae_source"], m["vae_note"]
        self._per_mpx = m["per_mpx"]
        self.oom_recoveries, self.oom_failures = m["oom_recoveries"], m["oom_failures"]

    # -- the engine protocol --------------------------------------------------------------------------
    def _load_locked(self):
        if self._pipe is not None:
            return self._pipe
        t0 = time.monotonic()
        self._pipe = self._load_in_worker("image model")  # loaded in this generation of the worker
        log.info("image model loaded in the worker card=%s s=%.2f", self.index, time.monotonic() - t0)
        return self._pipe

    def needs_load(self) -> bool:
        return self._pipe is None or self._pipe != self._generation

    def load(self):
        if self.needs_load():
            self._pipe = None
        return super().load()

    def evict(self) -> None:
        if self._pipe is None or self._proc is None or not self._proc.ready.is_set():
            return  # nothing loaded in this worker: nothing on its card
        with contextlib.suppress(WorkerFailed):  # the worker died: its memory left with it (WorkerCard shows when)
            self._call("evict")

    def restore(self) -> float:
        return float(self._call("restore") or 0.0)

    def release_cache(self) -> None:
        self._call("release_cache")

    def render(self, params, on_step=lambda s, t: None, cancelled=lambda: False, checkpoint=lambda s, t: None,
               on_oom=None, tail=None):
        """As ImageEngine.render, in the worker; returns (a handle to the image kept there, facts)."""
        self.load()
        proc = self._ready()
        calls = {
            "step": lambda n, total: on_step(n, total),
            "checkpoint": lambda n, total: checkpoint(n, total),
            "oom": lambda: on_oom() if on_oom is not None else None,
            "tail": lambda: tail(lambda: float(self._call("drop") or 0.0)) if tail is not None else None,
        }
        try:
            facts = self._run(proc, ("render", asdict(params)), calls, cancelled)
        except WorkerFailed as exc:  # it died under a command of a pause (restore) or of the tail (drop)
            raise WorkerFailed(f"{exc} The image was not saved.") from None
        except _Dead as exc:
            self._died(proc, f"the image worker on card {self.index} {exc} mid-render")
            raise WorkerFailed(
                f"The image worker on card {self.index} {exc} mid-render: the image was not saved. "
                "Clair started a new worker; render again."
            ) from None
        return _Image(proc.generation), facts

    def save(self, image, params: RenderParams, owner: str | None = None) -> Path:
        if not isinstance(image, _Image) or image.generation != self._generation:
            raise WorkerFailed("The image worker was restarted after this render: the image was not saved. Render again.")
        path = Path(self._call("save", asdict(params), owner)).resolve()
        if path.parent != self.output_dir:
            raise ImageModelUnavailable(f"The image worker saved outside the output folder ({path}).")
        return path


class WorkerLocalChat(_Link, LocalChat):
    """The in-process chat model (CLAIR_LOCAL_CHAT_MODEL), run by a worker process on card 0: tokens come back
    one at a time, each answered with whether to stop (a round trip per token, see bench/worker.py)."""

    kind = "chat"
    what = "chat worker"
    failed = ChatWorkerFailed
    unavailable = ChatUnavailable

    def __init__(self, cfg: Config, index: int = 0, cards: list[dict] | None = None):
        LocalChat.__init__(self, cfg)
        self._link(index, cards, start=False)

    def _fresh(self) -> None:
        self._model = None  # the model lives in the worker: a fresh one has none loaded
        self._swap = None

    def needs_load(self) -> bool:
        return self._model is None or self._model != self._generation

    def _load_locked(self):
        if not self.needs_load():
            return
        self._model = None
        self._model = self._load_in_worker("in-process chat model")  # loaded in this generation of the worker

    def evict(self) -> None:
        if self.needs_load() or self._proc is None or not self._proc.ready.is_set():
            return  # nothing loaded in this worker: nothing on its card
        with contextlib.suppress(ChatWorkerFailed):  # the worker died: its memory left with it
            self._call("evict")

    def _stream_locked(self, messages: list[dict], stop: threading.Event, meta: dict):
        self._load_locked()
        proc = self._ready()
        ended = False
        self._busy = True
        try:
            reply = self._exchange(proc, ("generate", self.label, messages))
            while reply[0] == "cb":
                if reply[2]:
                    yield reply[2]
                reply = self._exchange(proc, ("ret", stop.is_set()))
            ended = True
        except _Dead as exc:
            ended = True
            self._died(proc, f"the chat worker on card {self.index} {exc} mid-reply")
            raise ChatWorkerFailed(
                f"The chat worker on card {self.index} {exc} mid-reply: the rest of the reply is lost. Clair started "
                "a new worker; send the message again."
            ) from None
        finally:
            self._busy = False
            if not ended:  # the reader went away (a closed stream): stop generate() in the worker too
                self._answer_raise(proc, "Cancelled", "The reader stopped.")
        meta.update(self._answer(reply) or {})


def card_specs(cfg: Config) -> list[dict]:
    """The cards a worker may be pinned to: each simulated card (its file and size), else CUDA card 0.

    Real CUDA cards beyond the first are not enumerated: the web process would have to initialise CUDA (or
    read NVML) to count them."""
    from clair.device import simcard

    sizes = cfg.sim_gpu_sizes
    if not sizes:
        return [{"index": 0, "sim_file": None, "sim_gb": 0.0, "cuda": 0}]
    return [
        {"index": i, "sim_file": simcard.card_path(cfg.sim_gpu_path, i), "sim_gb": gb, "cuda": None}
        for i, gb in enumerate(sizes)
    ]


def start_engines(cfg: Config, first_card: int = 0) -> tuple[ImageEngine, LocalChat]:
    """The image engine and the in-process chat model for Studio: in worker processes when CLAIR_WORKERS=on,
    else in this process.

    With workers, the web process's cards become WorkerCards (readings from the workers on each card) and never
    CUDA: a simulated card keeps its file for the outside reading; without one, this process knows nothing
    until a worker answers. The chat worker starts at its first use (chat often goes to Ollama)."""
    from clair.device import simcard

    if cfg.workers != "on":
        simcard.configure(cfg.sim_gpu_gb, cfg.sim_gpu_path)
        return ImageEngine(cfg), LocalChat(cfg)
    specs = card_specs(cfg)
    bases = simcard.configure_cards(cfg.sim_gpu_sizes, cfg.sim_gpu_path) if cfg.sim_gpu_sizes else [device.Device()]
    image = WorkerImageEngine(cfg, first_card if first_card < len(specs) else 0, specs)
    chat = WorkerLocalChat(cfg, 0, specs)
    cards = [WorkerCard(base, [image, chat], i) for i, base in enumerate(bases)]
    device.install(cards[0])
    if len(cards) > 1:
        device.set_cards(cards)
    if not bases[0].present:
        image.startup_s()  # the budget comes from the worker's first reading: wait for it
    return image, chat
