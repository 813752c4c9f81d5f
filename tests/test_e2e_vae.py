"""End to end, the check from issue 11: the demo on a 20 GB budget with an 8B model loaded in Ollama (the
stand-in). With the fp16-safe VAE a 1024² render starts without any unload and a chat sent during it is
answered at once; with CLAIR_VAE=stock the same render evicts the model first."""

from __future__ import annotations

import time

import pytest

from tests.ollama_standin import OllamaStandin
from tests.support import App, wait_until

pytestmark = pytest.mark.slow
MODEL = "llama3.1:8b"


@pytest.mark.parametrize("vae", ["fp16-fix", "stock"])
def test_seed_card_render_beside_the_llm(tmp_path, vae):
    standin = OllamaStandin({MODEL: 4.9}, load_delay=0.2, unload_delay=0.5, token_delay=0.01).start()
    app = App(
        tmp_path,
        {"OLLAMA_HOST": standin.host, "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_VRAM_BUDGET_GB": "20", "CLAIR_VAE": vae},
        args=("--demo",),
    )
    try:
        assert app.client.predict("load it", [], api_name="/chat") == "You said: load it"
        assert standin.loaded() == [MODEL]
        st = app.status()
        assert st["image"]["vae"]["setting"] == vae
        assert st["image"]["vae"]["fp16_decode"] is (vae == "fp16-fix")
        standin.reset_logs()

        render = app.client.submit("a slow one", "", 12, 5.0, 1024, 1024, 1, api_name="/render")  # ~8 s on tiny (2 cores)
        wait_until(lambda: (app.status()["holder"] or {}).get("kind") == "render", timeout=60)
        sent_at = time.time()
        chat = app.client.submit("are you there?", [], api_name="/chat")
        assert chat.result(timeout=60) == "You said: are you there?"
        _, info = render.result(timeout=120)
        assert sent_at < info["gpu_finished_at"], "the chat was not sent during the render; the test proves nothing"
        (req,) = [r for r in standin.requests_to("/api/chat") if r.messages]
        unloads = [r for r in standin.requests_to("/api/chat") if r.keep_alive == 0]

        if vae == "fp16-fix":
            # 1024² with the fp16-safe VAE (~11.6 GiB) fits beside the 8B model: no unload, not even asked for.
            assert info["evicted"] == [] and unloads == []
            assert [e.kind for e in standin.events_for(MODEL)] == []  # no unload, no reload
            # Answered at once: it reached Ollama and finished while the render still held the GPU.
            assert info["gpu_started_at"] < req.arrived and req.finished < info["gpu_finished_at"]
        else:
            # The stock VAE's 16.4 GiB does not fit beside it: the model leaves first. The chat then pauses the
            # render at a step boundary (CLAIR_PREEMPT=auto), which evicts the model again when it resumes.
            assert info["evicted"] == ["ollama"] and "budget" in info["evict_reason"]
            unloaded_at = next(e.at for e in standin.events_for(MODEL) if e.kind == "unloaded")
            assert unloads[0].arrived < unloaded_at <= info["gpu_started_at"]
            assert info["preemptions"] >= 1 and info["gpu_started_at"] < req.arrived < info["gpu_finished_at"]
        assert app.status()["stats"]["budget_exceeded"] == 0
    finally:
        app.stop()
        standin.stop()
