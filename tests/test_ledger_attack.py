"""Attack on the arbiter's ledger (invariant 14) on a simulated card: a client of the Ollama port hangs up right
after its grant, while Ollama is still making room for its model. The lease goes back at once (Exchange) and
the reading after it shows no such model; Ollama then loads nothing for it (a cancelled request's load fails in
`llama.Load(req.ctx)`, server/sched.go), so a render may be planned into that memory. (The stand-in loaded the
model anyway, and the render that followed left Ollama 2.4 of its 9.3 GiB on the GPU: the stand-in's fault.)"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading

import pytest

from clair.base.config import Config
from clair.device import simcard
from clair.engines.image import RenderParams
from clair.service.studio import Studio
from tests.ollama_standin import OllamaStandin

pytestmark = pytest.mark.slow
GiB = 1024**3
SMALL, MID, BIG = "qwen2.5:0.5b", "llama3.1:8b", "mistral-nemo:12b"


def _hang_up_after_sending(url: str, body: dict) -> None:
    """A client that sends its request and hangs up before any answer (Exchange closes Clair's request)."""
    host, port = url.split("//", 1)[1].split(":")
    raw = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"POST /api/generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw
        )


def test_a_load_whose_client_hung_up_while_ollama_made_room_leaves_nothing_unplanned(tmp_path):
    card = str(tmp_path / "card.json")
    standin = OllamaStandin(
        {SMALL: 0.4, MID: 4.9, BIG: 7.1}, unload_delay=1.0, max_loaded_models=2, num_parallel=1, sim_card=card
    ).start()
    try:
        cfg = dataclasses.replace(
            Config(), chat_backend="ollama", ollama_host=standin.host, image_model="tiny", vae="fp16-fix",
            output_dir=str(tmp_path / "outputs"), sim_gpu_gb=20, sim_gpu_file=card, warmup=False,
            evict_timeout_s=5.0, ollama_timeout_s=5.0, queue_timeout_s=30.0, max_new_tokens=4,
        )
        studio = Studio(cfg)
        real = studio.image.footprint
        studio.image.footprint = lambda w, h: real(1024, 1024)
        studio.image.load().sim_render_size = (1024, 1024)
        studio.image.learns = False
        for model in (SMALL, MID):  # both loaded: Ollama's two slots (OLLAMA_MAX_LOADED_MODELS=2) are full
            list(studio.chat("hi", model=model, stop=threading.Event()))
        eng = studio.ollama
        # The Ollama port's /api/generate for a third model, as Job.hold and relay do it; the client hangs up as
        # soon as the request is on its way: Ollama unloads the least recently used model to make room first.
        lease = studio.request_for(eng, BIG, "api:attack")
        lease.wait(30)
        eng.after_grant(lease, BIG)
        studio.preflight(lease, eng.to_load(BIG))
        body = {"model": BIG, "prompt": "", "keep_alive": cfg.keep_alive_value, "options": {"num_ctx": cfg.chat_num_ctx}}
        _hang_up_after_sending(standin.url, body)
        standin.wait_until(lambda: any(e.kind == "unload_requested" for e in standin.events))
        standin.wait_until(lambda: any(r.model == BIG and r.finished for r in standin.requests), timeout=15)
        assert BIG not in standin.loaded() and not standin.events_for(BIG)  # Ollama loaded nothing for it
        studio.after_hold(eng, lease)  # the lease goes back at once (Exchange), and the engine re-reads /api/ps
        # A render now: the ledger must count the model Ollama is about to load.
        studio.render(RenderParams("attack", steps=2, width=64, height=64, seed=1), lambda t, f: None, threading.Event())
        # The chat that comes next loads it for real, under its own lease: the card has room for it.
        list(studio.chat("hi", model=BIG, stop=threading.Event()))
        state = simcard.read(card)
        assert state["oom"] == 0, state.get("oom_log")
        assert not standin.short_loads, standin.short_loads  # Ollama found the card short: layers on the CPU
    finally:
        standin.stop()
