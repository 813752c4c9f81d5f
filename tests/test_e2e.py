"""End to end: `python app.py` in a subprocess, driven through gradio_client, Ollama played by the stand-in.

What the stand-in logs (each request's arrival, each model's load/unload) is compared with the
timestamps Clair reports, to check the traffic-cop protocol from the outside.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import ollama
import pytest

from tests.ollama_standin import OllamaStandin
from tests.support import App, free_port, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama3.1:8b"


@pytest.fixture(scope="module")
def standin():
    s = OllamaStandin({MODEL: 4.9, "qwen2.5:0.5b": 0.4}, load_delay=0.3, unload_delay=0.6, token_delay=0.01)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def app(standin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    # Preemption off: these tests pin the held-chat protocol (tests/test_preempt.py covers pausing).
    env = {"OLLAMA_HOST": standin.host, "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_EVICT_TIMEOUT_S": "3", "CLAIR_PREEMPT": "off"}
    a = App(tmp, env)
    yield a
    a.stop()


@pytest.fixture(autouse=True)
def _settle(request, standin):
    """Each test starts with the GPU free and a fresh stand-in log."""
    yield
    if "app" in request.fixturenames:
        app = request.getfixturevalue("app")
        wait_until(lambda: app.status()["holder"] is None and not app.status()["waiting"], timeout=15)
    standin.reset_logs()


def chats_sent(standin, after=0.0):
    """Real chat requests (not loads/unloads) that reached Ollama."""
    return [r for r in standin.requests_to("/api/chat") if r.messages and r.arrived > after]


def test_chat_streams_with_pinned_context_and_keep_alive(app, standin):
    job = app.client.submit("hi there", [{"role": "user", "content": "earlier"}], api_name="/chat")
    final = job.result(timeout=30)
    outputs = job.outputs()
    assert final == "You said: hi there"
    assert len(outputs) >= 3 and all(final.startswith(o) for o in outputs)  # a growing reply
    (req,) = chats_sent(standin)
    assert req.options["num_ctx"] == 4096
    assert req.keep_alive == "30m"
    assert req.messages[0]["role"] == "system"
    assert req.messages[-2:] == [
        {"role": "user", "content": "earlier"},
        {"role": "user", "content": "hi there"},
    ]


def test_render_evicts_ollama_first_and_starts_only_once_ps_is_empty(app, standin):
    app.client.predict("load the model please", [], api_name="/chat")
    assert standin.loaded() == [MODEL]
    standin.reset_logs()

    image, info = app.render()
    assert Path(info["path"]).is_file() and image["orig_name"] == Path(info["path"]).name
    kinds = [(e.kind, e.at) for e in standin.events_for(MODEL)]
    unloaded_at = next(at for kind, at in kinds if kind == "unloaded")
    unload_req = next(r for r in standin.requests_to("/api/chat") if r.keep_alive == 0)
    # The unload was asked for, Ollama answered at once, the memory came back unload_delay later, and
    # only then did the render take the GPU.
    assert unload_req.arrived < unloaded_at <= info["gpu_started_at"]
    assert info["evict_s"] >= 0.5
    assert info["evicted"] == ["ollama"]
    assert info["gpu_started_at"] < info["gpu_finished_at"]
    assert info["width"] == 64 and info["steps"] == 2 and info["seed"] == 7

    # Recovery: the chat model is loaded again in the background with Clair's keep_alive.
    warm = wait_until(
        lambda: [r for r in standin.requests_to("/api/chat") if not r.messages and r.keep_alive == "30m"],
        timeout=10,
    )
    assert warm[0].arrived >= info["gpu_finished_at"]
    wait_until(lambda: standin.loaded() == [MODEL], timeout=10)


def test_chat_sent_during_a_render_is_held_until_the_gpu_is_released(app, standin):
    render_job = app.client.submit(
        "a slow one", "", 12, 5.0, 1024, 1024, 1, api_name="/render"
    )  # ~8 s on the tiny model (2 cores): the chat below is sent well within it
    wait_until(lambda: (app.status()["holder"] or {}).get("kind") == "render", timeout=30)
    sent_at = time.time()
    chat_job = app.client.submit("are you there?", [], api_name="/chat")
    waiting = wait_until(lambda: app.status()["waiting"], timeout=10)
    assert waiting[0]["kind"] == "chat" and waiting[0]["position"] == 1
    assert "render" in waiting[0]["reason"]
    assert waiting[0]["eta_s"] >= 0
    _, info = render_job.result(timeout=120)
    assert chat_job.result(timeout=30) == "You said: are you there?"
    assert sent_at < info["gpu_finished_at"], "the chat was not sent during the render; the test proves nothing"
    (req,) = chats_sent(standin)
    assert req.arrived >= info["gpu_finished_at"]


def test_a_failing_render_releases_the_gpu_and_the_queue_moves_on(app, standin):
    # Someone else's request keeps the model busy, so Ollama defers the unload past Clair's 3 s timeout.
    app.client.predict("warm", [], api_name="/chat")
    gate = standin.hold(MODEL)
    other = threading.Thread(
        target=lambda: ollama.Client(host=standin.url).chat(model=MODEL, messages=[{"role": "user", "content": "x"}])
    )
    other.start()
    gate.wait_reached(timeout=5)
    try:
        with pytest.raises(Exception, match=r"Ollama did not confirm within .*still lists llama3\.1:8b"):
            app.render()
        st = app.status()
        assert st["holder"] is None and st["waiting"] == []
        assert st["stats"]["evict_failures"] >= 1
    finally:
        gate.release()
        other.join(10)
    # Nothing stayed locked: chat and render both work again.
    assert app.client.predict("still alive?", [], api_name="/chat") == "You said: still alive?"
    _, info = app.render(seed=8)
    assert info["seed"] == 8


def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(app):
    with pytest.raises(Exception, match="multiple of 8"):
        app.render(width=100)
    with pytest.raises(Exception, match="prompt"):
        app.render(prompt="  ")
    with pytest.raises(Exception, match="Type a message"):
        app.client.predict("", [], api_name="/chat")
    with pytest.raises(Exception, match="role"):
        app.client.predict("hi", [{"role": "wizard", "content": "x"}], api_name="/chat")
    assert app.client.predict("ok?", [], api_name="/chat") == "You said: ok?"


def test_missing_model_says_how_to_pull(standin, tmp_path):
    a = App(tmp_path, {"OLLAMA_HOST": standin.host, "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_CHAT_MODEL": "mistral:7b"})
    try:
        with pytest.raises(Exception, match=r"ollama pull mistral:7b"):
            a.client.predict("hi", [], api_name="/chat")
        standin.add_model("mistral:7b", 4.1)
        assert a.client.predict("hi", [], api_name="/chat") == "You said: hi"
    finally:
        a.stop()


def test_starts_without_ollama_or_checkpoint_says_why_and_recovers(tmp_path):
    port = free_port()
    broken = tmp_path / "sdxl"
    broken.mkdir()  # exists but is not a diffusers folder
    a = App(
        tmp_path,
        {"OLLAMA_HOST": f"127.0.0.1:{port}", "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_IMAGE_MODEL": str(broken)},
    )
    try:
        with pytest.raises(Exception, match=r"Ollama is not reachable at http://127.0.0.1:\d+.*ollama serve"):
            a.client.predict("hello", [], api_name="/chat")
        with pytest.raises(Exception, match="not a diffusers folder"):
            a.render()
        assert a.status()["holder"] is None

        # The causes go away: Ollama starts, the checkpoint appears. No restart needed.
        from clair.engines.tiny import save_tiny_sdxl

        save_tiny_sdxl(broken)
        with OllamaStandin({MODEL: 4.9}, port=port) as s:
            assert a.client.predict("hello", [], api_name="/chat") == "You said: hello"
            assert s.requests_to("/api/chat")
        _, info = a.render()
        assert Path(info["path"]).is_file()
    finally:
        a.stop()


def test_budget_policy_evicts_only_what_does_not_fit(tmp_path):
    """CLAIR_VRAM_BUDGET_GB=20: the ledger uses Ollama's reported sizes and SDXL's prior per resolution.

    With the stock VAE (fp32 decode); the fp16-safe VAE's smaller renders are in test_e2e_vae.py."""
    standin = OllamaStandin({MODEL: 4.9}, unload_delay=0.3).start()
    a = App(
        tmp_path,
        {"OLLAMA_HOST": standin.host, "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_VRAM_BUDGET_GB": "20", "CLAIR_VAE": "stock"},
    )
    try:
        a.client.predict("load it", [], api_name="/chat")
        st = a.status()
        assert st["budget_gb"] == 20.0 and st["policy"] == "budget"
        (ollama_res,) = [r for r in st["resident"] if r["tenant"] == "ollama"]
        reported = sum(m["size_vram"] for m in standin.ps()) / 2**30
        assert ollama_res["gb"] == pytest.approx(reported, abs=0.01)  # the ledger reads /api/ps

        # 512x512 needs ~9.3 GiB beside the 8B model's ~5.3: both fit, nothing is evicted.
        _, info = a.render(width=512, height=512)
        assert info["evicted"] == [] and info["evict_s"] < 0.5
        assert standin.loaded() == [MODEL]
        assert not [r for r in standin.requests_to("/api/chat") if r.keep_alive == 0]

        # 1024x1024 needs ~16.4 GiB: with the 8B model that passes 20 GiB, so Ollama is unloaded first.
        _, info = a.render(width=1024, height=1024)
        assert info["evicted"] == ["ollama"]
        assert "budget" in info["evict_reason"]
        assert a.status()["last_handover"]["reason"] == info["evict_reason"]
        assert a.status()["stats"]["budget_exceeded"] == 0
    finally:
        a.stop()
        standin.stop()


def test_a_render_whose_client_went_away_stops_and_frees_the_gpu(app, standin):
    """A closed tab or a dropped script: Gradio marks the session's jobs gone; the render stops at its next
    step instead of holding the GPU for nobody (found by a review: a 150-step render ran to its end)."""
    import json
    import uuid

    from tests.support import Raw

    raw = Raw(app.url)
    dep = raw.dep("render")
    session = uuid.uuid4().hex[:12]
    body = {"data": ["gone", "", 150, 5.0, 1024, 1024, 1], "fn_index": dep["id"], "trigger_id": None, "session_hash": session}
    assert raw.http.post("/gradio_api/queue/join", json=body).status_code == 200
    progress = 0
    with raw.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "progress":
                progress += 1
                if progress >= 3:
                    break  # the client hangs up mid-render
    t0 = time.monotonic()
    wait_until(lambda: app.status()["holder"] is None and not app.status()["waiting"], timeout=30)
    assert time.monotonic() - t0 < 15, "the render went on for nobody"
    assert "the client went away" in app.log.read_text()
    assert app.client.predict("still here?", [], api_name="/chat") == "You said: still here?"
