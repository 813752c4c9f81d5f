"""The worker process's side: the real ImageEngine (or the in-process chat model, LocalChat), driven over a pipe.

Started by clair/engines/worker.py as a fresh interpreter (`python -m clair.engines.worker_main JOB_FD PROBE_FD`;
CUDA does not survive `fork`), one per card, with `CUDA_VISIBLE_DEVICES` set to its card (so the card is
`cuda:0` in here) or, on a simulated card, its card's state file. The first thing `main()` does is read its
settings and pin itself to that card, before anything can touch CUDA. Then it runs the same `ImageEngine` Clair runs in-process, and answers two pipes:

* the *job* pipe: one command at a time, each answered. `load`, `render`, `save`, `evict`, `restore`,
  `release_cache`, `ping`; for the in-process chat model (`kind` "chat") `generate`, whose text goes up a piece
  at a time as `("cb", "token", text)`, each answered with whether to stop. While a render runs, the engine's callbacks (a step, the checkpoint between steps, the tail,
  out of memory) go *up* the pipe as `("cb", name, ...)` and block until the web process answers `("ret",
  cancelled)`, or `("raise", kind, text)` to stop the render there (a cancel, a queue time-out while paused).
  Meanwhile the web process may send the commands a pause needs (`evict`, `restore`, `release_cache`, the
  tail's `drop`), and they are served inside the callback, at the step boundary, as in-process.
* the *probe* pipe, served by a thread of its own: `read` (the card's memory, read together in here, where
  the process that holds it is) and `ping`. It answers while a step computes.

Images never cross the pipe: the render keeps its image here until `save` writes it to the output folder and
answers the path. Everything else that crosses is plain data (numbers, strings, small dicts).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from clair.base import errors


def _pin(card: dict) -> None:
    """Pin this process to its card before anything can initialise CUDA."""
    if card.get("sim_file"):
        os.environ["CLAIR_SIM_GPU_FILE"] = card["sim_file"]
        from clair.device import simcard

        simcard.configure(float(card["sim_gb"]), card["sim_file"])
    elif card.get("cuda") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(card["cuda"])
    else:
        from clair.device import card as device

        device.install(device.Device())  # no card: the CPU, as in-process without one


def _warn_without_cuda(card: dict, cfg, kind: str) -> None:
    """A worker meant for a CUDA card that finds none says so (the web process never looks at CUDA)."""
    from clair.device import gpu

    model = cfg.local_chat_model if kind == "chat" else cfg.image_model
    if card.get("cuda") is not None and model != "tiny" and not cfg.demo and not gpu.cuda():
        logging.getLogger("clair.engines.worker_main").warning(
            "the %s worker for card %s found no CUDA device: %s will run on the CPU (minutes a render). Check the "
            "NVIDIA driver and that torch is a CUDA build, or run with --demo", kind, card["index"], model,
        )


def _reading() -> tuple | None:
    from clair.device import gpu

    r = gpu.reading()
    return None if r is None else (r.total, r.free, r.reserved, r.allocated)


def _serve_probe(probe) -> None:
    while True:
        try:
            msg = probe.recv()
        except (EOFError, OSError):
            return
        try:
            probe.send(("ok", _reading()) if msg[0] == "read" else ("ok", "pong"))
        except (EOFError, OSError):
            return


class Stop(Exception):
    """The web process stopped a render from a callback: `kind` names the error class to give back."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


class Worker:
    def __init__(self, conn, cfg, kind: str, learns: bool):
        self.conn = conn
        self.kind = kind
        if kind == "chat":
            from clair.engines.chat import LocalChat

            self.engine = LocalChat(cfg)
        else:
            from clair.engines.image import ImageEngine

            self.engine = ImageEngine(cfg)
            self.engine.learns = learns
        self.image = None  # the last render's image, until `save` writes it
        self.drop = None  # the tail's drop(), while the tail callback runs

    def mirror(self) -> dict:
        """What the web process keeps a copy of: sizes (and the VAE's facts), for footprints and /status."""
        e = self.engine
        swap = e._swap
        if self.kind == "chat":
            return {"weights": swap.nbytes if swap is not None else None}
        return {
            "weights": swap.nbytes if swap is not None else None,
            "on_gpu": bool(getattr(swap, "on_gpu", True)),  # evicted (a pause, keep-alive): a render restores them
            "vae_kind": e.vae_kind,
            "vae_source": e.vae_source,
            "vae_note": e.vae_note,
            "per_mpx": e._per_mpx,
            "oom_recoveries": e.oom_recoveries,
            "oom_failures": e.oom_failures,
        }

    def command(self, msg: tuple) -> tuple:
        """One command from the web process, answered with ("ok", value, mirror) or ("error", kind, text)."""
        op = msg[0]
        try:
            if op == "load":
                self.engine.load()
                value: Any = None
            elif op == "render":
                value = self.render(msg[1])
            elif op == "generate":
                value = self.generate(msg[1], msg[2])
            elif op == "save":
                value = self.save(msg[1], msg[2])
            elif op == "evict":
                value = self.engine.evict()
            elif op == "restore":
                value = self.engine.restore()
            elif op == "release_cache":
                value = self.engine.release_cache()
            elif op == "ping":  # liveness, and the protocol's round trip (bench/worker.py)
                return ("ok", None, None)
            elif op == "drop":
                value = self.drop() if self.drop is not None else 0.0
            else:
                return ("error", "BadRequest", f"unknown command {op!r}")
        except errors.ClairError as exc:
            return ("error", type(exc).__name__, str(exc))
        except Stop as exc:
            return ("error", exc.kind, str(exc))
        return ("ok", value, self.mirror())

    def up(self, *call) -> bool:
        """A callback to the web process: blocks until it answers, serving its commands meanwhile."""
        self.conn.send(("cb", *call))
        while True:
            msg = self.conn.recv()
            if msg[0] == "ret":
                self.cancel = bool(msg[1])
                return self.cancel
            if msg[0] == "raise":
                raise Stop(msg[1], msg[2])
            self.conn.send(self.command(msg))

    def render(self, fields: dict) -> dict:
        from clair.engines.image import RenderParams

        params = RenderParams(**fields)
        self.cancel = False
        self.image = None

        def tail(drop) -> None:
            self.drop = drop
            try:
                self.up("tail")
            finally:
                self.drop = None

        image, facts = self.engine.render(
            params,
            on_step=lambda n, total: self.up("step", n, total),
            cancelled=lambda: self.cancel,
            checkpoint=lambda n, total: self.up("checkpoint", n, total),
            on_oom=lambda: self.up("oom"),
            tail=tail,
        )
        self.image = (params, image)
        return facts

    def generate(self, model: str, messages: list) -> dict:
        """A chat reply: each piece of text goes up as ("cb", "token", text); the answer is the usage."""
        stop = threading.Event()
        meta: dict = {}
        self.cancel = False
        for text in self.engine.stream(model, messages, stop, meta=meta):
            if self.up("token", text):
                stop.set()  # the web process stopped reading: generate() ends at its next token
        return meta

    def save(self, fields: dict, owner: str | None) -> str:
        from clair.engines.image import RenderParams

        if self.image is None or self.image[0] != RenderParams(**fields):
            raise errors.ImageModelUnavailable("The image worker holds no such image: render it again.")
        params, image = self.image
        self.image = None
        return str(self.engine.save(image, params, owner=owner))

    def serve(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return  # the web process is gone: so is this worker's reason to live
            if msg[0] == "exit":
                return
            answer = self.command(msg)
            try:
                self.conn.send(answer)
            except (EOFError, OSError):
                return


def main(conn, probe) -> None:
    """The worker's entry point. Unexpected errors end the process: after a CUDA fault its context is
    unusable, and the web process starts a fresh worker."""
    _, card, cfg, kind, learns = conn.recv()  # ("start", card, settings, kind, learns): from the parent only
    _pin(card)
    threading.Thread(target=_serve_probe, args=(probe,), name="clair-worker-probe", daemon=True).start()
    worker = Worker(conn, cfg, kind, learns)
    _warn_without_cuda(card, cfg, kind)
    conn.send(("hello", os.getpid()))
    worker.serve()


if __name__ == "__main__":
    from multiprocessing.connection import Connection

    main(Connection(int(sys.argv[1])), Connection(int(sys.argv[2])))
