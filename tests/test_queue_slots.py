"""A chat's place in line is the arbiter's, not Gradio's: renders that fill their Gradio slots do not hold chats
back in Gradio's FIFO (end to end: `python app.py`, gradio_client, Ollama played by the stand-in)."""

from __future__ import annotations

import pytest

from tests.ollama_standin import OllamaStandin
from tests.support import App, wait_until

pytestmark = pytest.mark.slow
MODEL = "llama3.1:8b"


def test_a_chat_is_not_queued_behind_renders_in_gradios_slots(tmp_path):
    standin = OllamaStandin({MODEL: 4.9}, unload_delay=0.2).start()
    app = App(
        tmp_path,
        {"OLLAMA_HOST": standin.host, "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_MAX_QUEUE": "3", "CLAIR_MAX_JOBS_PER_USER": "3", "CLAIR_WARMUP": "0",
         "CLAIR_PREEMPT": "off"},
    )
    try:
        first = app.client.submit("one", "", 12, 5.0, 1024, 1024, 1, api_name="/render")  # ~8 s on tiny (2 cores)
        wait_until(lambda: (app.status()["holder"] or {}).get("kind") == "render", timeout=30)
        second = app.client.submit("two", "", 12, 5.0, 1024, 1024, 2, api_name="/render")  # queued behind the first
        chat = app.client.submit("are you there?", [], api_name="/chat")
        # The chat reaches the arbiter while the first render runs (CLAIR_CHAT_PRIORITY=next: it goes next).
        # Both reach the arbiter (Gradio's slots exceed the caps), and the chat is first in line.
        waiting = wait_until(lambda: len(app.status()["waiting"]) == 2 and app.status()["waiting"], timeout=10)
        assert [w["kind"] for w in waiting] == ["chat", "render"]
        assert chat.result(timeout=120) == "You said: are you there?"
        _, info_first = first.result(timeout=120)
        _, info_second = second.result(timeout=120)
        (req,) = [r for r in standin.requests_to("/api/chat") if r.messages]
        assert info_first["gpu_finished_at"] <= req.arrived < info_second["gpu_started_at"]
    finally:
        app.stop()
        standin.stop()
