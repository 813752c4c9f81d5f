"""In-process servers for the gateway tests: Clair's Studio with its Ollama-compatible app, or its /v1
routes behind the web guard, served by uvicorn on a free loopback port in a thread."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import uvicorn

from clair.base.config import Config
from clair.edge.users import Users
from clair.edge.web import Web
from clair.service.studio import Studio
from tests.support import free_port


class Served:
    """An ASGI app served on 127.0.0.1:<free port> until stop()."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def make_studio(standin, tmp_path: Path, **kw) -> Studio:
    """A Studio on the stand-in with the tiny image model. The VRAM budget is set (10 GiB: an 8B chat model
    and SDXL do not fit together), so a render holds chats back on any machine, with or without CUDA."""
    settings = {
        "vram_budget_gb": 10.0,
        "chat_backend": "ollama",
        "ollama_host": standin.host,
        "image_model": "tiny",
        "output_dir": str(tmp_path / "outputs"),
        "users_file": str(tmp_path / "users.json"),
        "warmup": False,
    }
    cfg = dataclasses.replace(Config(), **{**settings, **kw})
    return Studio(cfg)


def gateway_app(studio: Studio):
    from clair.adapters.gateway import Gateway

    return Gateway(studio, Web(studio.cfg, Users(studio.cfg.users_path))).app()


def v1_app(studio: Studio):
    """The /v1 routes behind the same guard as on Clair's web port (no Gradio: not needed here)."""
    from fastapi import FastAPI

    from clair.adapters.openai_api import router
    from clair.edge.web import Guard

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router(studio))
    app.add_middleware(Guard, web=Web(studio.cfg, Users(studio.cfg.users_path)))
    return app


def hold_render(studio: Studio, steps: int = 2):
    """Start a render in a thread that stops at its first step until `leave` is set.

    Returns (entered, leave, thread, result): result["info"] is the render's info once done.
    """
    from clair.engines.image import RenderParams

    entered, leave = threading.Event(), threading.Event()
    result: dict = {}

    def slow_step(text, frac):
        if text.startswith("Step"):
            entered.set()
            assert leave.wait(20)

    def run():
        result["path"], result["info"] = studio.render(RenderParams("y", steps=steps, width=64, height=64), slow_step)

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(30), "the render did not start"
    return entered, leave, t, result
