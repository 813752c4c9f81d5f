"""Preemption at step boundaries: a chat that cannot run beside a render pauses it, and the image is the same.

The policy (`should_yield`) is a table; the shell (`Arbiter.pause`) and the whole protocol (`Studio.render`
against the Ollama stand-in, with the tiny SDXL pipeline) are driven for real.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clair.arbiter import Arbiter, GiB, Req, Resident, Snapshot, joins_pause, pause_budget, plan, should_yield
from clair.base.config import Config
from clair.base.errors import Cancelled
from clair.engines.image import RenderParams
from clair.service.studio import Studio, Token
from tests.ollama_standin import OllamaStandin
from tests.support import wait_until

MODEL = "llama3.1:8b"


# --------------------------------------------------------------------------------------------------
# The policy, as a table
# --------------------------------------------------------------------------------------------------


def chat(i, need=5.7, order=None):
    return Req(i, "chat", "ollama", int(need * GiB), int(need * GiB), order or (1, 1, i))


def render(i=1, need=16.4, idle=6.5):
    return Req(i, "render", "image", int(need * GiB), int(idle * GiB), (i, 0))


def snap(running=(), waiting=(), residents=None, budget=20, policy="budget", preempt="auto"):
    residents = residents if residents is not None else {"image": Resident("image", int(16.4 * GiB), 2)}
    return Snapshot(policy, int(budget * GiB), residents, tuple(running), tuple(waiting), preempt)


def yields(s, r=None, ran_s=10.0, pauses=0, slice_s=3.0, max_pauses=3, **bounds):
    return should_yield(
        s, r or s.running[0], ran_s=ran_s, pauses=pauses, slice_s=slice_s, max_pauses=max_pauses, **bounds
    )


YIELD_CASES = [
    ("a chat that does not fit beside the render waits: pause", snap([render()], [chat(2)]), {}, True),
    ("nobody waits: carry on", snap([render()], []), {}, False),
    ("preemption off", snap([render()], [chat(2)], preempt="off"), {}, False),
    ("paused as often as allowed already", snap([render()], [chat(2)]), {"pauses": 3}, False),
    ("resumed less than a slice ago", snap([render()], [chat(2)]), {"pauses": 1, "ran_s": 1.0}, False),
    ("resumed a slice ago", snap([render()], [chat(2)]), {"pauses": 1, "ran_s": 3.5}, True),
    ("the first pause needs no slice", snap([render()], [chat(2)]), {"ran_s": 0.0}, True),
    (
        "fifo: a chat that came after the render does not jump it",
        snap([render()], [chat(2, order=(2, 0))]),
        {},
        False,
    ),
    (
        "a chat waiting behind another queued render does not pause this one",
        snap(
            [render()],
            [Req(3, "render", "image", int(16.4 * GiB), int(6.5 * GiB), (3, 0)), chat(4, order=(4, 0))],
        ),
        {},
        False,
    ),
    (
        "a chat bigger than the whole budget still gets its turn (it runs alone)",
        snap([render()], [chat(2, need=30)]),
        {},
        True,
    ),
    ("exclusive policy: any chat pauses the render", snap([render(need=9)], [chat(2, need=2)], policy="exclusive"), {}, True),
    ("unknown budget: same as exclusive", snap([render(need=9)], [chat(2, need=2)], budget=0), {}, True),
]


@pytest.mark.parametrize(("name", "s", "kw", "expected"), YIELD_CASES, ids=[c[0] for c in YIELD_CASES])
def test_should_yield(name, s, kw, expected):
    assert bool(yields(s, **kw)) is expected


def test_a_chat_that_fits_beside_the_render_runs_beside_it_but_always_pauses_it():
    small = render(need=9.0)
    residents = {"image": Resident("image", int(9 * GiB), 2)}
    s = snap([small], [chat(2)], residents=residents)
    assert [g.req.id for g in plan(s)] == [2]  # auto: granted beside the render, nothing to pause for
    s = snap([small], [chat(2)], residents=residents, preempt="always")
    assert plan(s) == []  # always: the chat waits for the GPU alone...
    assert yields(s)  # ...and the render pauses for it


def test_the_pause_evicts_the_renders_weights_only_when_the_chat_needs_the_room():
    residents = {"image": Resident("image", int(16.4 * GiB), 2)}
    # While paused the image tenant is idle at its weights (6.5 GiB): a 5.7 GiB chat fits beside it.
    paused = Req(1, "render", "image", int(16.4 * GiB), int(6.5 * GiB), (1, 1, 9))
    idle = {"image": Resident("image", int(6.5 * GiB), 2)}
    s = Snapshot("budget", int(20 * GiB), idle, (), (chat(2), paused))
    assert [(g.req.id, g.evict) for g in plan(s)] == [(2, ())]
    # A 15 GiB chat does not: the weights leave.
    s = Snapshot("budget", int(20 * GiB), idle, (), (chat(2, need=15), paused))
    assert [(g.req.id, g.evict) for g in plan(s)] == [(2, ("image",))]
    assert residents  # (the running footprint is only used while it renders)


# --------------------------------------------------------------------------------------------------
# The shell
# --------------------------------------------------------------------------------------------------


def test_pause_hands_the_gpu_to_the_waiting_chat_and_keeps_the_renders_place():
    a = Arbiter(policy="budget", budget_bytes=20 * GiB, render_slice_s=0.0, pause_join_s=0.0)
    r = a.request("render", "image", int(16.4 * GiB), int(6.5 * GiB), label="render").wait(1)
    c = a.request("chat", "ollama", int(5.7 * GiB), label="chat")
    assert not c.poll(0)
    assert a.should_yield(r)
    cont = a.pause(r, "test")
    assert r.released_at is not None and cont.paused and cont.pauses == 1
    assert c.poll(1)  # the chat has the GPU
    st = a.status()
    assert [w["paused"] for w in st["waiting"]] == [True]
    assert "paused" in st["waiting"][0]["label"]
    # A chat arriving now queues behind the paused render: chats cannot starve it.
    late = a.request("chat", "ollama", int(5.7 * GiB), label="late")
    assert [w["id"] for w in a.status()["waiting"]] == [cont.req.id, late.req.id]
    c.release()
    assert cont.poll(1) and not late.poll(0)
    assert a.stats["preemptions"] == 1
    cont.release()
    assert late.poll(1)
    late.release()
    assert a.is_idle()


def test_chats_arriving_just_after_a_pause_join_the_chats_then_later_ones_queue_behind_the_render():
    a = Arbiter(policy="budget", budget_bytes=20 * GiB, render_slice_s=0.3, pause_join_s=0.3)
    r = a.request("render", "image", int(16.4 * GiB), int(6.5 * GiB)).wait(1)
    c = a.request("chat", "ollama", int(5.7 * GiB))
    cont = a.pause(r)
    assert c.poll(1)
    soon = a.request("chat", "ollama", int(5.7 * GiB))
    assert soon.poll(1)  # joined the running chats: no swap, no wait
    time.sleep(0.35)
    late = a.request("chat", "ollama", int(5.7 * GiB))
    assert not late.poll(0.05)  # behind the paused render
    c.release()
    soon.release()
    assert cont.poll(1) and not late.poll(0)
    cont.release()
    assert late.poll(1)
    late.release()


def test_with_preemption_chats_join_a_chat_phase_for_a_slice_before_a_waiting_render_stops_them():
    a = Arbiter(policy="exclusive", budget_bytes=20 * GiB, render_slice_s=0.3)
    first = a.request("chat", "ollama", int(5.7 * GiB)).wait(1)
    render = a.request("render", "image", int(16.4 * GiB))
    soon = a.request("chat", "ollama", int(5.7 * GiB))
    assert soon.poll(0.5)  # joined the streaming chat: the model is loaded, no swap
    time.sleep(0.35)
    late = a.request("chat", "ollama", int(5.7 * GiB))
    assert not late.poll(0.05)  # the render has waited a slice: chats queue behind it now
    first.release()
    soon.release()
    assert render.poll(1) and not late.poll(0)
    render.release()
    assert late.poll(1)
    late.release()


def test_cancel_while_paused_frees_everything():
    a = Arbiter(policy="budget", budget_bytes=20 * GiB)
    r = a.request("render", "image", int(16.4 * GiB), int(6.5 * GiB)).wait(1)
    c = a.request("chat", "ollama", int(5.7 * GiB))
    cont = a.pause(r)
    assert c.poll(1)
    with pytest.raises(Cancelled):
        cont.wait(5, cancelled=lambda: True)
    assert cont.released_at is not None
    c.release()
    assert a.is_idle()


# --------------------------------------------------------------------------------------------------
# The whole protocol: Studio against the stand-in, the tiny pipeline, weights that really leave
# --------------------------------------------------------------------------------------------------


class ScrambleOnEvict:
    """The image engine's weight swap, made observable on a CPU: evict() overwrites every weight with NaN
    (as if its GPU memory were handed to someone else) and restore() puts the saved copy back. A render
    that carried on without restoring would come out as NaN."""

    def __init__(self, swap):
        self.real = swap
        self.nbytes = swap.nbytes
        self.saved: dict[int, torch.Tensor] = {}
        self.evictions = 0

    def _tensors(self):
        for m in self.real.modules:
            yield from m.parameters()
            yield from m.buffers()

    def evict(self) -> float:
        if not self.saved:
            for t in self._tensors():
                if t.is_floating_point():
                    self.saved[id(t)] = t.data.clone()
                    t.data.fill_(float("nan"))
            self.evictions += 1
        return 0.0

    def restore(self) -> float:
        for t in self._tensors():
            if id(t) in self.saved:
                t.data.copy_(self.saved.pop(id(t)))
        return 0.0


@pytest.fixture
def standin():
    s = OllamaStandin({MODEL: 4.9}, unload_delay=0.05).start()
    yield s
    s.stop()


def make(standin, tmp_path, **kw) -> Studio:
    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path),
        **{"warmup": False, "render_slice_s": 0.0, "max_preemptions": 5, **kw},
    )
    studio = Studio(cfg)  # no CUDA, no budget: a chat never fits beside a render
    studio.image.load()
    studio.image._swap = ScrambleOnEvict(studio.image._swap)
    return studio


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def render_with_chats_at(studio, standin, params, steps_with_chat):
    """Render; at each step in `steps_with_chat`, a chat is sent and the render only goes on once it waits."""
    replies: list[str] = []
    threads: list[threading.Thread] = []
    progress: list[str] = []

    def send(i):
        replies.append("".join(e.text for e in studio.chat(f"hello {i}") if isinstance(e, Token)))

    def on_progress(text, frac):
        progress.append(text)
        if text.startswith("Step "):
            step = int(text.split()[1].split("/")[0])
            if step in steps_with_chat:
                t = threading.Thread(target=send, args=(step,))
                t.start()
                threads.append(t)
                wait_until(lambda: any(w["kind"] == "chat" for w in studio.arbiter.status()["waiting"]), 10)

    path, info = studio.render(params, on_progress=on_progress)
    for t in threads:
        t.join(10)
    return path, info, replies, progress


def test_a_render_paused_several_times_gives_the_very_same_image(standin, tmp_path):
    studio = make(standin, tmp_path)
    params = RenderParams("a lighthouse at dusk", steps=10, width=64, height=64, seed=1234)
    alone, alone_info = studio.render(params)
    assert alone_info["preemptions"] == 0

    standin.reset_logs()
    paused, info, replies, progress = render_with_chats_at(studio, standin, params, {2, 5, 7})
    assert info["preemptions"] == 3
    assert info["paused_s"] > 0
    assert studio.image._swap.evictions >= 3  # the weights really left (and came back) each time
    assert replies == ["You said: hello 2", "You said: hello 5", "You said: hello 7"]
    # Each chat reached Ollama while the render was still going, and the render evicted the model again.
    sent = [r for r in standin.requests_to("/api/chat") if r.messages]
    assert len(sent) == 3 and all(r.arrived < info["gpu_finished_at"] for r in sent)
    assert "ollama" in info["evicted"]
    assert any(p.startswith("Paused for a chat at step 5/10") for p in progress)
    assert np.array_equal(pixels(alone), pixels(paused))
    assert studio.arbiter.is_idle()


def test_the_real_weight_swap_round_trips_through_pauses_to_the_same_image(standin, tmp_path):
    """The same, with Clair's own WeightSwap re-pointing the weights between two copies (device "cpu")."""
    from clair.device import gpu

    studio = make(standin, tmp_path)
    pipe = studio.image.load()
    modules = [getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    swap = studio.image._swap = gpu.WeightSwap(modules, "off", device="cpu")
    evictions = []
    real_evict = swap.evict
    swap.evict = lambda: (evictions.append(swap.on_gpu), real_evict())[1]
    params = RenderParams("a lighthouse", steps=8, width=64, height=64, seed=77)
    alone, _ = studio.render(params)
    paused, info, _, _ = render_with_chats_at(studio, standin, params, {2, 5})
    assert info["preemptions"] == 2
    assert evictions.count(True) >= 2  # the weights were on the "device" and left it at each pause
    assert np.array_equal(pixels(alone), pixels(paused))


def test_ancestral_scheduler_also_gives_the_same_image(standin, tmp_path):
    """A scheduler that draws noise at every step (from the render's generator) is safe too: the
    generator stays inside the paused call, so it draws the same numbers."""
    from diffusers import EulerAncestralDiscreteScheduler

    studio = make(standin, tmp_path)
    pipe = studio.image.load()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    params = RenderParams("noise", steps=8, width=64, height=64, seed=99)
    alone, _ = studio.render(params)
    paused, info, _, _ = render_with_chats_at(studio, standin, params, {3, 6})
    assert info["preemptions"] == 2
    assert np.array_equal(pixels(alone), pixels(paused))


def test_preemption_off_makes_the_chat_wait_for_the_whole_render(standin, tmp_path):
    studio = make(standin, tmp_path, preempt="off")
    params = RenderParams("x", steps=6, width=64, height=64, seed=3)
    standin.reset_logs()
    done = threading.Event()
    result = {}

    def on_progress(text, frac):
        if text == "Step 2/6":
            t = threading.Thread(target=lambda: (result.setdefault("r", list(studio.chat("wait"))), done.set()))
            t.start()
            wait_until(lambda: studio.arbiter.status()["waiting"], 10)

    _, info = studio.render(params, on_progress=on_progress)
    assert done.wait(10)
    assert info["preemptions"] == 0
    sent = [r for r in standin.requests_to("/api/chat") if r.messages]
    assert sent and sent[0].arrived >= info["gpu_finished_at"]


def test_max_preemptions_bounds_the_pauses(standin, tmp_path):
    studio = make(standin, tmp_path)
    studio.arbiter.max_preemptions = 1
    params = RenderParams("x", steps=8, width=64, height=64, seed=5)
    _, info, replies, _ = render_with_chats_at(studio, standin, params, {2, 4})
    assert info["preemptions"] == 1
    assert len(replies) == 2  # the second chat waited for the end of the render instead


def cancel_while_paused(studio, standin):
    """A render paused at step 2 for a chat that Ollama holds, cancelled while paused: it raises Cancelled.
    Returns (the hold on the chat: release it, the event set once the chat has ended)."""
    cancel, gate = threading.Event(), threading.Event()
    params = RenderParams("x", steps=6, width=64, height=64, seed=5)
    held = standin.hold(MODEL)  # the chat holds the GPU until the gate opens

    def on_progress(text, frac):
        if text == "Step 2/6":
            threading.Thread(target=lambda: (list(studio.chat("hold")), gate.set()), daemon=True).start()
            wait_until(lambda: studio.arbiter.status()["waiting"], 10)
        if text.startswith("Paused for a chat") and "resumes" not in text:
            cancel.set()

    with pytest.raises(Cancelled):
        studio.render(params, on_progress=on_progress, cancel=cancel)
    return held, gate


def test_cancel_while_paused_stops_the_render_and_frees_the_gpu(standin, tmp_path):
    studio = make(standin, tmp_path)
    held, gate = cancel_while_paused(studio, standin)
    assert not [w for w in studio.arbiter.status()["waiting"] if w["kind"] == "render"]
    held.release()
    assert gate.wait(10)
    wait_until(studio.arbiter.is_idle, 5)
    time.sleep(0.05)
    assert studio.arbiter.is_idle()


# --------------------------------------------------------------------------------------------------
# Issue 18: chats that arrive together run in one pause; the slice bounds how often, not how long a
# chat waits; a render's tail (its decode) lets a chat in beside it
# --------------------------------------------------------------------------------------------------

BOUND_CASES = [
    # (name, snapshot, should_yield kwargs, expected)
    ("a chat arriving as the render resumes: the last pause began a slice ago, pause again",
     snap([render()], [chat(2)]), {"pauses": 1, "ran_s": 3.2}, True),
    ("the last pause began less than a slice ago: not yet", snap([render()], [chat(2)]), {"pauses": 1, "ran_s": 2.0}, False),
    ("paused max_paused_s in all already: carry on", snap([render()], [chat(2)]), {"paused_s": 60.0, "max_paused_s": 60.0}, False),
    ("paused less than max_paused_s in all: pause", snap([render()], [chat(2)]), {"paused_s": 59.0, "max_paused_s": 60.0}, True),
    ("a render in its tail (the decode) never pauses",
     snap([dataclasses.replace(render(need=8), tail=True)], [chat(2, need=15)]), {}, False),
]


@pytest.mark.parametrize(("name", "s", "kw", "expected"), BOUND_CASES, ids=[c[0] for c in BOUND_CASES])
def test_should_yield_bounds(name, s, kw, expected):
    assert bool(yields(s, **kw)) is expected


JOIN_CASES = [
    # (name, pause age s, chats joined so far, expected)
    ("a chat arriving as the pause begins joins it", 0.0, 0, True),
    ("one arriving later within the join window joins it", 2.9, 3, True),
    ("after the window it queues behind the render", 3.0, 0, False),
    ("after max_pause_chats it queues behind the render", 0.5, 8, False),
]


@pytest.mark.parametrize(("name", "age", "joined", "expected"), JOIN_CASES, ids=[c[0] for c in JOIN_CASES])
def test_joins_pause(name, age, joined, expected):
    assert joins_pause(age, joined, join_s=3.0, max_chats=8) is expected


def test_a_render_in_its_tail_lets_chats_in_even_under_always():
    tail = dataclasses.replace(render(need=9.0), tail=True)
    residents = {"image": Resident("image", int(9 * GiB), 2)}
    s = snap([tail], [chat(2)], residents=residents, preempt="always")
    assert [g.req.id for g in plan(s)] == [2]  # the decode is short: the chat (or a reload) starts beside it


def test_chats_arriving_while_a_pause_lasts_join_it_until_its_bounds_then_queue_behind():
    a = Arbiter(policy="budget", budget_bytes=20 * GiB, render_slice_s=0.0, pause_join_s=30.0, max_pause_chats=2)
    r = a.request("render", "image", int(16.4 * GiB), int(6.5 * GiB)).wait(1)
    first = a.request("chat", "ollama", int(5.7 * GiB))
    second = a.request("chat", "ollama", int(5.7 * GiB))  # both wait when the pause begins: both are served
    cont = a.pause(r)
    assert first.poll(1) and second.poll(1)
    joined = [a.request("chat", "ollama", int(5.7 * GiB)) for _ in range(2)]
    assert all(j.poll(1) for j in joined)  # arrived while the pause lasts: joined it
    late = a.request("chat", "ollama", int(5.7 * GiB))
    assert not late.poll(0.05)  # max_pause_chats reached: behind the render
    for ls in (first, second, *joined):
        assert not cont.poll(0)  # the render resumes only when none of the pause's chats is left
        ls.release()
    assert cont.poll(1)
    # The late chat pauses the resumed render at its next step: the slice counts from the pause's start.
    assert a.should_yield(cont)
    cont2 = a.pause(cont)
    assert late.poll(1) and cont2.pauses == 2
    late.release()
    assert cont2.poll(1)
    cont2.release()
    assert a.is_idle()


def test_the_slice_counts_from_the_start_of_the_last_pause_so_a_chat_at_resume_pauses_at_the_next_step():
    a = Arbiter(policy="budget", budget_bytes=20 * GiB, render_slice_s=0.2, pause_join_s=0.0)
    r = a.request("render", "image", int(16.4 * GiB), int(6.5 * GiB)).wait(1)
    c = a.request("chat", "ollama", int(5.7 * GiB))
    cont = a.pause(r)
    assert c.poll(1)
    time.sleep(0.25)  # the pause lasts longer than the slice (a model's load does)
    c.release()
    assert cont.poll(1)
    again = a.request("chat", "ollama", int(5.7 * GiB))  # arrives as the render resumes
    assert a.should_yield(cont)  # its very next step
    cont2 = a.pause(cont)
    assert again.poll(1)
    again.release()
    assert cont2.poll(1) and cont2.paused_s >= 0.25
    cont2.release()


def test_shrink_lets_a_chat_that_fits_beside_the_decode_start_before_the_render_ends():
    a = Arbiter(policy="budget", budget_bytes=20 * GiB, preempt="off")
    r = a.request("render", "image", int(16.4 * GiB), int(6.5 * GiB)).wait(1)
    c = a.request("chat", "ollama", int(5.7 * GiB))
    assert not c.poll(0.05)
    a.shrink(r, int(10.1 * GiB), idle=0)  # the denoisers left: the decode needs 10.1 GiB
    assert c.poll(1)
    assert a.status()["stats"]["budget_exceeded"] == 0
    assert a.resident_bytes("image") == int(10.1 * GiB)
    a.shrink(r, int(15 * GiB))  # never grows back
    assert a.resident_bytes("image") == int(10.1 * GiB)
    r.release()
    assert a.resident_bytes("image") == 0  # nothing of it is left on the GPU
    c.release()
    assert a.is_idle()


def test_the_tail_takes_the_denoisers_off_before_the_decode_starts_the_reload_beside_it_and_keeps_the_image(
    standin, tmp_path
):
    """A render that evicted the chat model: at its tail the UNet and text encoders leave (Clair's WeightSwap,
    device "cpu"), the VAE alone decodes, the chat model's reload is granted beside the decode (the decode's
    peak and the model fit the budget), and the image is pixel for pixel the one rendered without a tail."""
    from clair.device import gpu

    studio = make(standin, tmp_path, warmup=True, vram_budget_gb=20)
    studio.image.footprint = lambda w, h: (int(16.4 * GiB), int(6.46 * GiB))  # 1024², stock VAE: no fit beside the chat
    pipe = studio.image.load()
    swap = studio.image._swap = gpu.WeightSwap(
        [getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")], "on", device="cpu"
    )
    params = RenderParams("a lighthouse", steps=6, width=64, height=64, seed=42)
    alone, info = studio.render(params)  # the chat model is not loaded: nobody needs the room, no tail
    assert info["tail_at"] is None and swap.on_gpu

    assert "".join(e.text for e in studio.chat("hi") if isinstance(e, Token))  # the chat model is loaded now
    seen: dict = {}

    def reloads() -> int:
        return sum(1 for h in list(studio.arbiter.holds) if h["kind"] == "chat" and h["label"].startswith("warm-up"))

    before = reloads()

    def at_decode(module, args):
        if seen:
            return
        host = {id(t): h for t, h in ((e[0](), e[1]) for e in swap._host.values()) if t is not None}
        unet = next(pipe.unet.parameters())
        vae = next(pipe.vae.parameters())
        seen["unet_off"] = unet.data_ptr() == host[id(unet)].data_ptr()
        seen["vae_on"] = vae.data_ptr() != host[id(vae)].data_ptr()
        # The reload is granted while the decode runs (it would wait for the release if the render kept its size):
        # it holds the GPU now, or it already has (a warm-up of 10 ms can come and go before this looks).
        holds_now = lambda: any(h["kind"] == "chat" for h in studio.arbiter.status()["holders"])  # noqa: E731
        wait_until(lambda: holds_now() or reloads() > before, 30)
        seen["ledger"] = studio.arbiter.resident_bytes("image")

    hook = pipe.vae.decoder.register_forward_pre_hook(at_decode)
    try:
        tailed, info = studio.render(params)
    finally:
        hook.remove()
    assert "ollama" in info["evicted"] and info["tail_at"] is not None
    assert seen["unet_off"] and seen["vae_on"]
    assert seen["ledger"] == studio.image.decode_footprint(64, 64) < int(16.4 * GiB)
    assert np.array_equal(pixels(alone), pixels(tailed))
    try:
        wait_until(lambda: studio.ollama.warmups == 1 and studio.arbiter.is_idle(), 30)
    except TimeoutError:
        raise AssertionError((studio.ollama.warmups, studio.arbiter.status())) from None
    assert MODEL in standin.loaded()
    assert not swap.on_gpu and studio.arbiter.resident_bytes("image") == 0  # the image weights left at the tail
    # The next render brings them back and gives the same image again.
    again, _ = studio.render(params)
    assert np.array_equal(pixels(alone), pixels(again))


# --------------------------------------------------------------------------------------------------
# Issue 18: under `always`, a render yields at most a share of its time to chats that could run beside it
# --------------------------------------------------------------------------------------------------

SEED = {"image": Resident("image", int(11.6 * GiB), 2)}  # the seed card: a 1024² render with the fp16-safe VAE


def seed_render(i=1, **kw):
    return Req(i, "render", "image", int(11.6 * GiB), int(6.46 * GiB), (i, 0), **kw)


BUDGET_CASES = [
    # (name, preempt, render, chats, elapsed s, share, expected budget s)
    ("always, a chat that fits beside the render: a share of its elapsed time", "always", seed_render(), [chat(2, 6.05)], 10.0, 0.2, 2.0),
    ("auto: a chat that fits runs beside it anyway, no budget needed", "auto", seed_render(), [chat(2, 6.05)], 10.0, 0.2, float("inf")),
    ("always, a chat that does not fit: only a pause lets it run", "always", render(), [chat(2, 5.7)], 10.0, 0.2, float("inf")),
    ("a render that shares already", "always", seed_render(shares=True), [chat(2, 6.05)], 10.0, 0.2, float("inf")),
    ("share 1: no budget", "always", seed_render(), [chat(2, 6.05)], 10.0, 1.0, float("inf")),
    ("no chat to compare with", "always", seed_render(), [], 10.0, 0.2, float("inf")),
    ("share 0: never paused for a chat that fits", "always", seed_render(), [chat(2, 6.05)], 10.0, 0.0, 0.0),
]


@pytest.mark.parametrize(("name", "preempt", "r", "chats", "elapsed", "share", "expected"), BUDGET_CASES, ids=[c[0] for c in BUDGET_CASES])
def test_pause_budget(name, preempt, r, chats, elapsed, share, expected):
    s = snap([r], chats, residents=SEED, preempt=preempt)
    assert pause_budget(s, r, chats, elapsed_s=elapsed, share=share) == pytest.approx(expected)


def test_joins_pause_within_the_renders_pause_budget_only():
    assert joins_pause(0.5, 0, join_s=10, max_chats=8, paused_s=1.9, budget_s=2.0)
    assert not joins_pause(0.5, 0, join_s=10, max_chats=8, paused_s=2.0, budget_s=2.0)


def test_under_always_a_render_that_shares_runs_beside_a_chat_that_fits_and_does_not_pause_for_it():
    shared = seed_render(shares=True)
    s = snap([shared], [chat(2, 6.05)], residents=SEED, preempt="always")
    assert [g.req.id for g in plan(s)] == [2]
    assert not yields(s, shared)
    # A chat that does not fit beside it still pauses it (within should_yield's own bounds).
    assert yields(snap([shared], [chat(3, 9.0)], residents=SEED, preempt="always"), shared)


class FakeClock:
    """time.time() and time.monotonic() for the arbiter module, moved by the test only."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self):
        return self.now

    monotonic = time

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch):
    import clair.arbiter.shell as shell

    c = FakeClock()
    monkeypatch.setattr(shell, "time", c)
    return c


def test_under_always_a_render_pauses_for_chats_until_its_budget_then_shares_the_gpu_with_them(clock):
    a = Arbiter(
        policy="budget", budget_bytes=20 * GiB, preempt="always", render_slice_s=0.0, pause_join_s=30.0, max_pause_share=0.2
    )
    need, idle, chat_need = int(11.6 * GiB), int(6.46 * GiB), int(6.05 * GiB)
    r = a.request("render", "image", need, idle)
    assert r.poll(0)
    clock.now += 10.0  # it renders for 10 s
    c1 = a.request("chat", "ollama", chat_need)
    assert not c1.poll(0)  # always: the chat gets the GPU alone, so it waits for the render's next step
    assert a.should_yield(r)
    cont = a.pause(r)
    assert c1.poll(0)
    clock.now += 1.5  # paused 1.5 s of 11.5: within 20 %
    c2 = a.request("chat", "ollama", chat_need)
    assert c2.poll(0) and not cont.poll(0)  # joined the pause: the render waits for it
    clock.now += 1.5  # paused 3 s of 13: past 20 %
    c3 = a.request("chat", "ollama", chat_need)
    assert c3.poll(0)  # did not join; it fits beside the render, so it starts at once
    assert cont.poll(0) and cont.req.shares  # and the render resumes beside the chats still streaming
    assert cont.paused_s == 0 and a._paused_total(cont) == pytest.approx(3.0)
    c4 = a.request("chat", "ollama", chat_need)
    assert c4.poll(0) and not a.should_yield(cont)  # from now on chats share the GPU with it
    for ls in (c1, c2, c3, c4, cont):
        ls.release()
    assert a.is_idle() and a.status()["stats"]["budget_exceeded"] == 0


def test_a_render_paused_past_its_budget_resumes_at_the_next_hand_over(clock):
    a = Arbiter(
        policy="budget", budget_bytes=20 * GiB, preempt="always", render_slice_s=0.0, pause_join_s=30.0, max_pause_share=0.2
    )
    r = a.request("render", "image", int(11.6 * GiB), int(6.46 * GiB))
    assert r.poll(0)
    clock.now += 5.0
    chats = [a.request("chat", "ollama", int(6.05 * GiB)) for _ in range(2)]
    cont = a.pause(r)
    assert all(c.poll(0) for c in chats)
    clock.now += 4.0  # a long reply: the pause outlasts the budget (20 % of 9 s)
    chats[0].release()  # a hand-over: the render resumes beside the other chat, which keeps streaming
    assert cont.poll(0) and chats[1].released_at is None
    chats[1].release()
    cont.release()
    assert a.is_idle()
