"""The image engine in a worker process (CLAIR_WORKERS=on), on CPU: the real worker, spawned, with the tiny
pipeline, driven through Studio against the Ollama stand-in.

What it must show (issue 16): the worker does what the in-process engine does (the same image, pauses for a
chat at a step, cancel); killing it mid-render costs that render only (a clear message, the chat sent at the
same moment is answered, the next render succeeds, /healthz stays ok); a worker that hangs past CLAIR_STALL_S
is killed and replaced without restarting anything; /healthz fails only when workers keep dying.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clair.arbiter import GiB
from clair.base.config import Config
from clair.base.errors import Cancelled, ChatUnavailable
from clair.engines.image import RenderParams, read_metadata
from clair.engines.worker import Deaths, WorkerFailed
from clair.service.metrics import Metrics
from clair.service.panel import panel_data, panel_html
from clair.service.studio import Studio, Token, Waiting
from tests.ollama_standin import OllamaStandin
from tests.support import wait_until
from tests.test_preempt import cancel_while_paused, pixels, render_with_chats_at

MODEL = "llama3.1:8b"


@pytest.fixture
def standin():
    s = OllamaStandin({MODEL: 4.9}, unload_delay=0.05).start()
    yield s
    s.stop()


@pytest.fixture
def studios():
    made: list[Studio] = []
    yield made
    for made_one in made:
        if isinstance(made_one, Studio):
            made_one.image.close()
        else:
            made_one.stop()  # an Ollama stand-in


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One stand-in and one worker Studio (the default settings of `make`) for the tests that leave them as they
    found them: the worker serving, never restarted, the GPU idle. A worker's start is a fresh interpreter that
    imports torch and diffusers, ~5 s on 2 cores; the tests that kill or hang a worker make their own."""
    standin = OllamaStandin({MODEL: 4.9}, unload_delay=0.05).start()
    made: list[Studio] = []
    studio = make(made, standin, tmp_path_factory.mktemp("served"))
    yield studio, standin
    studio.image.close()
    standin.stop()


def make(studios, standin, tmp_path, **kw) -> Studio:
    cfg = dataclasses.replace(
        Config(),
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path / "out"),
        state_dir=str(tmp_path / "state"),
        **{"chat_backend": "ollama", "workers": "on", "warmup": False, "render_slice_s": 0.0, "max_preemptions": 5, **kw},
    )
    studio = Studio(cfg)
    studios.append(studio)
    return studio


def reply(studio: Studio, text: str) -> str:
    return "".join(e.text for e in studio.chat(text) if isinstance(e, Token))


def test_the_worker_renders_the_in_process_image_pauses_for_chats_at_steps_and_saves_in_the_output_folder(
    studios, served, tmp_path
):
    studio, standin = served
    params = RenderParams("a lighthouse at dusk", steps=8, width=64, height=64, seed=1234)
    inproc = make(studios, standin, tmp_path / "in", workers="off")
    alone, _ = inproc.render(params)

    assert studio.image.pid != os.getpid()
    path, info, replies, progress = render_with_chats_at(studio, standin, params, {2, 5})
    assert info["preemptions"] == 2  # paused at two step boundaries, in the worker
    assert replies == ["You said: hello 2", "You said: hello 5"]
    assert any(p.startswith("Paused for a chat at step 5/8") for p in progress)
    assert [p for p in progress if p.startswith("Step ")][:3] == ["Step 1/8", "Step 2/8", "Step 3/8"]
    assert np.array_equal(pixels(alone), pixels(path))  # the very same image as in this process
    assert os.path.dirname(path) == studio.cfg.output_dir  # written by the worker, in the output folder
    assert read_metadata(path)["seed"] == 1234
    assert studio.arbiter.is_idle()

    # A cancel reaches the worker at the next step; the worker goes on serving.
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        studio.render(params, on_progress=lambda t, f: t == "Step 2/8" and cancel.set(), cancel=cancel)
    again, _ = studio.render(params)
    assert np.array_equal(pixels(alone), pixels(again))
    assert studio.image.restarts == 0


def test_killing_the_worker_mid_render_costs_that_render_only(studios, standin, tmp_path):
    studio = make(studios, standin, tmp_path, preempt="off")
    params = RenderParams("a lighthouse", steps=6, width=64, height=64, seed=5)
    studio.render(params)  # loaded and warm
    first_pid = studio.image.pid
    chat: dict = {}

    def on_progress(text, frac):
        if text == "Step 2/6":
            # A chat arrives at the same moment: it waits for the render (preemption off) ...
            t = threading.Thread(target=lambda: chat.setdefault("reply", reply(studio, "still there?")))
            t.start()
            chat["thread"] = t
            wait_until(lambda: studio.arbiter.status()["waiting"], 10)
            os.kill(first_pid, signal.SIGKILL)  # ... and the worker dies under the render (a CUDA fault would)

    before = set(os.listdir(tmp_path / "out"))
    with pytest.raises(WorkerFailed) as err:
        studio.render(params, on_progress=on_progress)
    assert "killed by signal SIGKILL mid-render" in str(err.value)
    assert "not saved" in str(err.value)
    chat["thread"].join(10)
    assert chat["reply"] == "You said: still there?"  # the chat sent at that moment is answered
    assert set(os.listdir(tmp_path / "out")) == before  # nothing half-written
    assert studio.healthy()  # one death is not the house's problem

    path, _ = studio.render(params)  # the next render runs in a new worker
    assert os.path.exists(path)
    assert studio.image.pid != first_pid
    assert studio.image.restarts == 1
    assert studio.healthy()
    assert studio.arbiter.is_idle()
    errors = [e for e in studio.recent if e["event"] == "error"]
    assert errors and "not saved" in errors[-1]["text"]
    # The panel and /metrics count the restart, per card.
    assert "worker restarts: card 0: 1" in panel_html(panel_data(studio))
    body, _ = Metrics(studio).render()
    assert 'clair_worker_restarts_total{card="0"} 1.0' in body.decode()


def test_a_worker_that_hangs_past_the_stall_limit_is_killed_and_replaced(studios, standin, tmp_path):
    studio = make(studios, standin, tmp_path, stall_s=2.0)
    params = RenderParams("a lighthouse", steps=4, width=64, height=64, seed=9)
    patient = studio.image.cfg
    # The renders around the hung one run without the limit: on a shared CPU a first step can take 2 s.
    studio.image.cfg = dataclasses.replace(patient, stall_s=0)
    studio.render(params)
    studio.image.cfg = patient
    hung_pid = studio.image.pid

    def on_progress(text, frac):
        if text == "Step 2/4":
            os.kill(hung_pid, signal.SIGSTOP)  # it stops answering mid-render, as a hung kernel would

    with pytest.raises(WorkerFailed) as err:
        studio.render(params, on_progress=on_progress)
    assert "sent nothing for 2 s (CLAIR_STALL_S) and was killed" in str(err.value)
    assert "not saved" in str(err.value)
    assert studio.healthy()
    studio.image.cfg = dataclasses.replace(patient, stall_s=0)
    with pytest.raises(ProcessLookupError):
        os.kill(hung_pid, 0)  # killed (SIGKILL reaches a stopped process) and reaped
    path, _ = studio.render(params)  # the service never restarted: the same Studio renders again
    assert os.path.exists(path)
    assert studio.image.restarts == 1


def test_deaths_count_over_a_sliding_window():
    now = [0.0]
    deaths = Deaths(limit=3, window_s=300.0, clock=lambda: now[0])
    for t in (0.0, 100.0):
        now[0] = t
        deaths.record()
    assert not deaths.too_many()
    now[0] = 299.0
    deaths.record()
    assert deaths.too_many()  # three within five minutes
    now[0] = 301.0
    assert not deaths.too_many()  # the first has aged out
    assert deaths.total == 3


def test_healthz_fails_only_when_workers_keep_dying(studios, standin, tmp_path):
    studio = make(studios, standin, tmp_path)
    now = [1000.0]
    studio.image.deaths.clock = lambda: now[0]

    def kill_and_wait_for_the_next() -> None:
        pid = studio.image.pid
        os.kill(pid, signal.SIGKILL)  # between jobs: nothing is lost, the worker is replaced at once
        wait_until(lambda: studio.image.pid != pid, 10)

    for _ in range(2):
        kill_and_wait_for_the_next()
        now[0] += 60
        assert studio.healthy()
    kill_and_wait_for_the_next()
    assert not studio.healthy()
    assert "died 3 times in 5 minutes" in (studio.last_health_problem or "")
    assert studio.image.restarts == 3
    now[0] += 301
    assert studio.healthy()  # the deaths aged out: the worker that runs now is trusted again
    path, _ = studio.render(RenderParams("x", steps=2, width=64, height=64, seed=1))
    assert os.path.exists(path)


# --------------------------------------------------------------------------------------------------
# Two simulated cards (CLAIR_SIM_GPU_GB=12,24): one arbiter per card, renders placed by clair/arbiter/placement.py
# --------------------------------------------------------------------------------------------------


def two_cards(studios, tmp_path, sizes=(12.0, 24.0), ollama_gpus="0", **kw):
    """A Studio on two simulated cards, with the stand-in's runner on card `ollama_gpus`'s file."""
    from clair.device import simcard

    path = str(tmp_path / "sim-gpu.json")
    ollama_card = int(ollama_gpus)
    standin = OllamaStandin({MODEL: 4.9}, unload_delay=0.05, sim_card=simcard.card_path(path, ollama_card)).start()
    studios.append(standin)
    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path / "out"),
        state_dir=str(tmp_path / "state"),
        workers="on",
        sim_gpu_gb=sizes[0],
        sim_gpu_cards=tuple(sizes),
        sim_gpu_file=path,
        ollama_gpus=ollama_gpus,
        warmup=False,
        **kw,
    )
    studio = Studio(cfg)
    studios.append(studio)
    return studio, standin, path


def test_two_cards_chat_on_one_renders_on_the_other_with_no_evictions(studios, tmp_path):
    from clair.device import simcard

    studio, standin, path = two_cards(studios, tmp_path)
    assert len(studio.arbiters) == 2
    assert studio.arbiters[0].budget == int(10.5 * GiB) and studio.arbiters[1].budget == int(22.5 * GiB)
    assert reply(studio, "hello") == "You said: hello"
    params = RenderParams("a lighthouse", steps=4, width=512, height=512, seed=3)
    for _ in range(2):
        during: dict = {}

        def on_progress(text, frac, during=during):
            if text == "Step 2/4" and "events" not in during:
                during["events"] = list(studio.chat("during the render"))  # its own card: no waiting

        _, info = studio.render(params, on_progress=on_progress)
        assert info["evicted"] == [] and info["preemptions"] == 0, info
        assert not any(isinstance(e, Waiting) for e in during["events"])
        assert "".join(e.text for e in during["events"] if isinstance(e, Token)) == "You said: during the render"
    assert studio.image.index == 1  # the image worker runs on the 24 GB card
    assert not [r for r in standin.requests_to("/api/chat") if r.keep_alive == 0]  # Ollama never unloaded
    assert sum(a.status()["stats"]["swaps"] for a in studio.arbiters) == 0
    # Each card's memory is what runs on it: Ollama's runner on card 0, the image worker on card 1.
    assert simcard.held_by(path, "ollama") > 4 * GiB
    assert simcard.held_by(simcard.card_path(path, 1), "clair") > 6 * GiB
    assert simcard.held_by(simcard.card_path(path, 1), "ollama") == 0
    # The panel draws one bar per card; /metrics labels each card.
    html = panel_html(panel_data(studio))
    assert "card 0" in html and "card 1" in html
    body = Metrics(studio).render()[0].decode()
    assert 'clair_card_budget_bytes{card="1"}' in body
    assert 'clair_card_ledger_bytes{card="1",tenant="image"}' in body


def test_ollama_is_evicted_only_for_a_render_placed_on_its_own_card(studios, tmp_path):
    from clair.device import simcard

    studio, _, path = two_cards(studios, tmp_path, sizes=(12.0, 12.0))
    assert reply(studio, "hello") == "You said: hello"
    params = RenderParams("a lighthouse", steps=2, width=512, height=512, seed=3)
    _, info = studio.render(params)
    assert info["evicted"] == [] and studio.image.index == 1  # card 1 has room beside nothing: Ollama stays
    first_pid = studio.image.pid

    # Another program takes 4 GiB of card 1: the render no longer fits there (its own weights, the other
    # program's memory and its activations), and card 0 has room once Ollama leaves it.
    assert simcard.take(simcard.card_path(path, 1), "desktop:1", int(4 * GiB))
    _, info = studio.render(params)
    assert studio.image.index == 0 and studio.image.pid != first_pid  # one copy: the worker moved
    assert info["evicted"] == ["ollama"]  # evicted on its own card, for work placed there
    assert studio.image.restarts == 0  # a move is not a death
    assert not studio.arbiters[1].resident_bytes("image")
    assert simcard.held_by(simcard.card_path(path, 1), "clair") == 0  # the old worker's memory went with it
    assert reply(studio, "again") == "You said: again"


@pytest.mark.slow
def test_the_app_renders_through_workers_on_two_cards_and_replaces_a_dead_worker(tmp_path):
    """`python app.py` with CLAIR_WORKERS=on and two simulated cards: the real service path (start-up, the Gradio
    API, /healthz, /metrics), the worker a child process of the service."""
    import httpx
    import psutil

    from clair.device import simcard
    from tests.support import App

    path = str(tmp_path / "sim-gpu.json")
    standin = OllamaStandin({MODEL: 4.9}, unload_delay=0.05, sim_card=path).start()
    env = {
        "OLLAMA_HOST": standin.host, "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_WORKERS": "on",
        "CLAIR_SIM_GPU_GB": "12,24", "CLAIR_SIM_GPU_FILE": path, "CLAIR_OLLAMA_GPUS": "0",
    }
    app = App(tmp_path, env)
    try:
        app.render()
        status = app.status()
        assert [c["budget"] for c in status["cards"]] == [int(10.5 * GiB), int(22.5 * GiB)]
        assert simcard.held_by(simcard.card_path(path, 1), "clair") > 6 * GiB  # the worker's weights, on card 1

        def worker():
            kids = psutil.Process(app.proc.pid).children()
            return next((k for k in kids if "clair.engines.worker_main" in " ".join(k.cmdline())), None)

        first = wait_until(worker, 10)
        first.kill()  # between jobs: the service replaces it at once
        wait_until(lambda: app.status()["worker_restarts"]["1"] == 1, 20)
        assert httpx.get(app.url + "/healthz").status_code == 200
        app.render()  # a new worker renders
        assert worker().pid != first.pid
        assert app.status()["worker_restarts"] == {"0": 0, "1": 1}
        metrics = httpx.get(app.url + "/metrics").text
        assert 'clair_worker_restarts_total{card="1"} 1.0' in metrics
    finally:
        app.stop()
        standin.stop()


# --------------------------------------------------------------------------------------------------
# The in-process chat model in a worker of its own
# --------------------------------------------------------------------------------------------------


def test_the_in_process_chat_model_answers_from_its_worker_and_a_dead_one_costs_one_reply(studios, standin, tmp_path):
    studio = make(studios, standin, tmp_path, chat_backend="local", local_chat_model="tiny")
    events = list(studio.chat("hello"))
    tokens = [e for e in events if isinstance(e, Token) and e.text]
    assert len(tokens) > 1  # streamed a piece at a time, not in one burst
    assert studio.local.pid != os.getpid() and studio.local.pid != studio.image.pid
    assert studio.local.loaded and not hasattr(studio.local._model, "generate")  # the model is in the worker

    # A stop mid-reply reaches the worker; the next reply comes from the same worker.
    stop = threading.Event()
    got = []
    for e in studio.chat("a long story", stop=stop):
        if isinstance(e, Token) and e.text:
            got.append(e.text)
            stop.set()
    assert 1 <= len(got) < 5
    assert "".join(e.text for e in studio.chat("again") if isinstance(e, Token))

    # Killed mid-reply: that reply fails and says so; the next one comes from a new worker.
    first_pid = studio.local.pid
    with pytest.raises(ChatUnavailable, match="mid-reply"):
        for e in studio.chat("one more"):
            if isinstance(e, Token) and e.text:
                os.kill(first_pid, signal.SIGKILL)
    assert "".join(e.text for e in studio.chat("still there?") if isinstance(e, Token))
    assert studio.local.pid != first_pid
    assert studio.healthy()
    assert studio.worker_restarts() == {"0": 1}
    assert studio.arbiter.is_idle()


def test_a_cancel_while_paused_stops_the_render_inside_the_worker_and_it_serves_on(served):
    """The web side's callback raises (the pause's wait sees the cancel): the worker is told to raise the same
    error at that step, unwinds its render, and answers the next one."""
    studio, standin = served
    held, gate = cancel_while_paused(studio, standin)
    held.release()
    assert gate.wait(10)
    wait_until(studio.arbiter.is_idle, 10)
    path, _ = studio.render(RenderParams("x", steps=6, width=64, height=64, seed=5))  # the same worker, serving on
    assert os.path.exists(path) and studio.image.restarts == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 400), st.booleans()), max_size=30))
def test_deaths_too_many_is_three_within_any_five_minutes(steps):
    """Against a model: after any sequence of waits and deaths, too_many() says whether 3 fell in the last 300 s."""
    now = [0.0]
    deaths = Deaths(limit=3, window_s=300.0, clock=lambda: now[0])
    at: list[float] = []
    for wait, died in steps:
        now[0] += wait
        if died:
            deaths.record()
            at.append(now[0])
        assert deaths.too_many() == (sum(1 for t in at if now[0] - t <= 300.0) >= 3)
    assert deaths.total == len(at)


def test_a_dead_workers_memory_is_never_counted_free_before_the_card_shows_it_free(studios, standin, tmp_path):
    """The ledger drops the dead worker's model at the next plan; memory the card still shows held (a driver that
    has not given a killed process's memory back yet: here a holding left on the simulated card) counts as
    another program's, never as free, until the card frees it."""
    from clair.device import simcard

    path = str(tmp_path / "sim-gpu.json")
    studio = make(studios, standin, tmp_path, sim_gpu_gb=24.0, sim_gpu_file=path)
    studio.render(RenderParams("x", steps=2, width=512, height=512, seed=1))
    assert studio.arbiter.resident_bytes("image") > 6 * GiB
    assert simcard.held_by(path, "clair") > 6 * GiB  # the worker's weights on the card
    os.kill(studio.image.pid, signal.SIGKILL)
    wait_until(lambda: not simcard.held_by(path, "clair"), 10)  # the card gives a dead process's memory back
    assert simcard.take(path, "leftover", int(3 * GiB))  # ... but pretend 3 GiB are not back yet
    studio.sync()
    assert studio.arbiter.resident_bytes("image") == 0  # the model died with its worker
    assert studio.arbiter.resident_bytes("other") >= int(2.5 * GiB)  # still held: not free
    simcard.give_back(path, "leftover")
    studio.sync()
    assert studio.arbiter.resident_bytes("other") < int(0.5 * GiB)
