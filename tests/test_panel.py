"""The GPU panel (issue 9) and giving memory back: panel_data through a held render and a waiting chat,
the estimate from the render's measured pace, the HTML, eject, and CLAIR_IMAGE_KEEP_ALIVE.

Real parts: Studio and its arbiter, the tiny SDXL pipeline with Clair's own WeightSwap on device "cpu"
(so the weights really move between two copies), the Ollama stand-in over HTTP for chats.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from clair.base.config import Config
from clair.device import gpu
from clair.engines.image import RenderParams
from clair.service import panel
from clair.service.studio import Studio, Token
from tests.ollama_standin import OllamaStandin
from tests.support import wait_until

MODEL = "llama3.1:8b"
STEP_S = 0.15  # each denoising step is slowed to about this (the test's own pace, not the code's)


@pytest.fixture(scope="module")
def standin():
    s = OllamaStandin({MODEL: 4.9}, unload_delay=0.02).start()
    yield s
    s.stop()


def make(standin, tmp_path, **kw) -> Studio:
    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path),
        warmup=False,
        preempt="off",  # the chat waits for the whole render (no pause), so the panel sees a queue
        **kw,
    )
    studio = Studio(cfg)
    pipe = studio.image.load()
    modules = [getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    studio.image._swap = gpu.WeightSwap(modules, "off", device="cpu")
    return studio


def test_panel_shows_the_holder_the_queue_and_the_ledger_with_an_estimate_from_the_measured_pace(standin, tmp_path):
    studio = make(standin, tmp_path)
    assert "".join(e.text for e in studio.chat("first") if isinstance(e, Token))  # Ollama's model loaded
    at_step, go = threading.Event(), threading.Event()
    steps, hold_at = 12, 4

    def on_progress(text, frac):
        if text.startswith("Step "):
            step = int(text.split()[1].split("/")[0])
            time.sleep(STEP_S)
            if step == hold_at:
                at_step.set()
                go.wait(20)

    params = RenderParams("a lighthouse", steps=steps, width=64, height=64, seed=5)
    result: dict = {}
    render = threading.Thread(
        target=lambda: result.update(out=studio.render(params, on_progress=on_progress, owner="alice"))
    )
    render.start()
    replies: list[str] = []
    try:
        assert at_step.wait(60)
        chat = threading.Thread(
            target=lambda: replies.append("".join(e.text for e in studio.chat("hi", owner="bob") if isinstance(e, Token)))
        )
        chat.start()
        wait_until(lambda: studio.arbiter.status()["waiting"], 10)
        time.sleep(0.3)  # a few more of the chat's queue polls
        d = panel.panel_data(studio, viewer="alice")
        as_bob, as_carol = panel.panel_data(studio, viewer="bob"), panel.panel_data(studio, viewer="carol")
    finally:
        go.set()
    render.join(60)
    chat.join(30)

    # The holder: the render, for alice, at its step, with the time left from its own pace.
    [h] = d["holders"]
    assert (h["kind"], h["label"], h["owner"], h["phase"]) == ("render", "render 64x64", "alice", "running")
    assert (h["done"], h["total"]) == (hold_at, steps)
    left = (steps - hold_at) * STEP_S
    assert 0.5 * left <= h["remaining_s"] <= 2.5 * left + 1
    # The queue: bob's chat, starting when the render's remaining steps are done (not a fixed average:
    # before any render finished, the old estimate was the 15 s default hold).
    [w] = d["queue"]
    assert (w["kind"], w["owner"], w["position"]) == ("chat", None, 1)  # bob's, shown to alice without his name
    # Each user sees their own job's name, nobody else's.
    assert as_bob["queue"][0]["owner"] == "bob" and as_bob["holders"][0]["owner"] is None
    assert as_carol["queue"][0]["owner"] is None and as_carol["holders"][0]["owner"] is None
    assert "alice" not in panel.panel_html(as_bob) and "bob" in panel.panel_html(as_bob)
    assert "alice" not in panel.panel_html(as_carol) and "bob" not in panel.panel_html(as_carol)
    assert 0.5 * left <= w["eta_s"] <= 2.5 * left + 1
    assert "render" in w["reason"]
    # The ledger: the image model resident (busy); Ollama was evicted for the render.
    seg = {s["tenant"]: s for s in d["vram"]["segments"]}
    assert seg["image"]["busy"] and seg["image"]["bytes"] > 0
    assert "ollama" not in seg
    assert any(x["what"] == "evict" and x["tenant"] == "ollama" for x in d["handovers"])
    assert any(x["kind"] == "render" for x in d["timeline"]["holds"])

    # The Chat tab's "sent in about N s" comes from the same estimate (the chat saw it while waiting).
    assert replies and replies[0]
    _, info = result["out"]
    assert info["render_s"] > 0

    html = panel.panel_html(d)
    assert "render 64x64" in html and "bob" not in html and "alice" in html and "<svg" in html
    compact = panel.compact_html(d)
    assert "GPU: rendering" in compact and "1 waiting" in compact
    # Text from outside is escaped.
    d["queue"][0]["label"] = "<img src=x onerror=alert(1)>"
    assert "<img src=x" not in panel.panel_html(d)
    # After: the GPU is free, the timeline has both holds.
    after = panel.panel_data(studio)
    assert not after["holders"] and not after["queue"]
    assert {"render", "chat"} <= {x["kind"] for x in after["timeline"]["holds"]}
    assert "GPU free" in panel.compact_html(after)


def test_eject_refuses_a_busy_tenant_and_unloads_an_idle_one(standin, tmp_path):
    studio = make(standin, tmp_path)
    at_step, go = threading.Event(), threading.Event()

    def on_progress(text, frac):
        if text.startswith("Step 2/"):
            at_step.set()
            go.wait(20)

    t = threading.Thread(target=lambda: studio.render(RenderParams("x", steps=4, width=64, height=64, seed=1), on_progress))
    t.start()
    try:
        assert at_step.wait(60)
        said = studio.eject("image")
        assert "stays on the GPU" in said and "busy" in said
        assert studio.image._swap.on_gpu  # untouched
    finally:
        go.set()
    t.join(60)
    assert studio.arbiter.resident_bytes("image") > 0 and studio.image._swap.on_gpu
    assert "left the GPU" in studio.eject("image")
    assert studio.arbiter.resident_bytes("image") == 0 and not studio.image._swap.on_gpu
    assert "not on the GPU" in studio.eject("image")
    with pytest.raises(Exception, match="Unknown model"):
        studio.eject("../etc")


def test_image_keep_alive_unloads_after_idle_and_the_next_render_loads_it_back(standin, tmp_path):
    studio = make(standin, tmp_path, image_keep_alive="0.4")
    params = RenderParams("x", steps=2, width=64, height=64, seed=1)
    studio.render(params)
    assert studio.image._swap.on_gpu
    t_done = time.monotonic()
    wait_until(lambda: not studio.image._swap.on_gpu, 10)
    assert time.monotonic() - t_done >= 0.3  # not before the keep-alive ran out
    assert studio.arbiter.resident_bytes("image") == 0
    assert any(e["event"] == "keep-alive" for e in studio.recent)
    # A render right after loads the weights back, and the timer starts again.
    _, info = studio.render(params)
    assert info["render_s"] > 0
    assert studio.arbiter.resident_bytes("image") > 0
    wait_until(lambda: not studio.image._swap.on_gpu, 10)
    assert studio.arbiter.is_idle()


def test_keep_alive_negative_keeps_the_model(standin, tmp_path):
    studio = make(standin, tmp_path, image_keep_alive="-1")
    studio.render(RenderParams("x", steps=1, width=64, height=64, seed=1))
    time.sleep(0.3)
    assert studio.image._swap.on_gpu and studio._keepalive is None


def test_keep_alive_never_unloads_the_model_under_a_running_render(standin, tmp_path):
    """A keep-alive far shorter than the render: the weights stay on the device at every step."""
    studio = make(standin, tmp_path, image_keep_alive="0.05")
    params = RenderParams("x", steps=5, width=64, height=64, seed=2)
    studio.render(params)  # starts the keep-alive timer
    seen: list[bool] = []

    def on_progress(text, frac):
        if text.startswith("Step "):
            seen.append(studio.image._swap.on_gpu)
            time.sleep(0.12)  # longer than the keep-alive, at every step

    studio.render(params, on_progress=on_progress)
    assert seen == [True] * 5
    wait_until(lambda: not studio.image._swap.on_gpu, 10)


def test_other_users_api_jobs_show_without_name_or_address():
    entry = {"kind": "chat", "label": "api:llama3.1:8b (carol@192.168.1.44)", "owner": None}
    shown = panel._private(entry, "alice")
    assert shown["label"] == "api:llama3.1:8b" and shown["owner"] is None
    assert panel._private({**entry, "owner": "alice"}, "alice")["label"] == entry["label"]
    assert panel._private({**entry, "owner": "alice"}, None)["owner"] is None


def test_the_status_endpoint_hides_other_users_jobs_too():
    st = {
        "holder": {"kind": "render", "label": "render 64x64", "owner": "alice"},
        "holders": [{"kind": "render", "label": "render 64x64", "owner": "alice"}],
        "waiting": [{"kind": "chat", "label": "api:m (bob@10.0.0.5)", "owner": None}],
        "last_handover": {"to": "api:m (bob@10.0.0.5)", "wait_s": 1.0},
    }
    seen = panel.private_status(st, "carol")
    assert "alice" not in str(seen) and "bob" not in str(seen) and "10.0.0.5" not in str(seen)
    assert panel.private_status(st, "alice")["holder"]["owner"] == "alice"
