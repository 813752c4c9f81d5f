"""Fail fast and quietly when a model cannot be had: a load failure is remembered with its reason, requests get
it at once, re-checks follow a back-off in the background, a fixed cause is tried at once, and the problem
sticks (in /status too) until a load succeeds."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from clair import main
from clair.base.config import Config
from clair.base.errors import ChatUnavailable, ImageModelUnavailable
from clair.engines.image import ImageEngine, RenderParams, _short
from clair.engines.loadgate import LoadGate
from clair.engines.tiny import save_tiny_sdxl
from clair.service.studio import Studio

pytestmark = pytest.mark.usefixtures("offline")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_back_off_doubles_to_ten_minutes_and_rechecks_in_the_background() -> None:
    clock, state = Clock(), {"fp": 1}
    gate = LoadGate(lambda: (state["fp"],), clock=clock)
    assert gate.blocked() is None  # nothing known: load inline
    loads: list[float] = []
    done = threading.Event()

    def recheck() -> None:
        loads.append(clock.now)
        gate.failed("still offline")
        done.set()

    gate.failed("offline")
    delays = []
    for _ in range(7):
        n = len(loads)
        clock.now = gate.retry_at - 1
        assert gate.blocked(recheck) in ("offline", "still offline")  # answered at once, not due yet
        assert not gate._rechecking and len(loads) == n  # and no attempt started
        delays.append(gate.delay_s)
        clock.now = gate.retry_at  # due: this request still gets the known problem, the re-check runs aside
        done.clear()
        assert gate.blocked(recheck) is not None
        assert done.wait(5)
        while gate._rechecking:
            time.sleep(0.001)
    assert delays == [30, 60, 120, 240, 480, 600, 600]
    assert len(loads) == 7
    assert gate.problem == "still offline"

    state["fp"] = 2  # the folder appeared / the cache changed: try now, inline
    assert gate.blocked(recheck) is None
    gate.succeeded()
    assert gate.problem is None and gate.blocked(recheck) is None


def test_an_offline_image_model_is_refused_at_once_and_the_problem_sticks(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from diffusers import StableDiffusionXLPipeline

    calls: list[str] = []
    original = StableDiffusionXLPipeline.from_pretrained

    def spy(source, **kwargs):
        calls.append(source)
        return original(source, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", spy)
    cfg = dataclasses.replace(
        Config(), image_model="example-org/no-such-sdxl", output_dir=str(tmp_path), ollama_shares_gpu="no"
    )
    studio = Studio(cfg)
    params = RenderParams("x", steps=2, width=64, height=64)
    with pytest.raises(ImageModelUnavailable) as first:
        studio.render(params)
    tried = len(calls)
    assert tried >= 1
    for _ in range(3):  # more renders, page reloads: the same answer at once, no new attempt
        with pytest.raises(ImageModelUnavailable) as again:
            studio.render(params)
        assert str(again.value) == str(first.value)
        assert studio.status()["image"]["problem"] == str(first.value)
    assert len(calls) == tried
    assert studio.arbiter.is_idle()

    # Due: the request is still answered at once; the re-check runs in the background.
    caplog.set_level(logging.DEBUG, logger="clair.engines.loadgate")
    studio.image.gate.retry_at = 0
    with pytest.raises(ImageModelUnavailable):
        studio.render(params)
    deadline = time.monotonic() + 60
    while studio.image.gate.failures < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(calls) > tried
    assert studio.image.gate.delay_s == 60
    assert studio.status()["image"]["problem"] == str(first.value)


def test_a_fixed_folder_loads_at_once_despite_the_back_off(tmp_path) -> None:
    folder = tmp_path / "realvis"
    engine = ImageEngine(dataclasses.replace(Config(), image_model=str(folder), output_dir=str(tmp_path / "o")))
    with pytest.raises(ImageModelUnavailable, match="does not exist"):
        engine.load()
    engine.gate.retry_at += 3600
    with pytest.raises(ImageModelUnavailable, match="does not exist"):
        engine.load()
    save_tiny_sdxl(folder)
    engine.load()
    assert engine.problem() is None and engine.gate.failures == 0


def test_an_offline_chat_model_answers_at_once_after_the_first_failure(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    calls: list[str] = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(source, *args, **kwargs):
        calls.append(source)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    cfg = dataclasses.replace(
        Config(), chat_backend="local", local_chat_model="example-org/no-such-chat", output_dir=str(tmp_path)
    )
    studio = Studio(cfg)
    with pytest.raises(ChatUnavailable) as first:
        list(studio.chat("hi"))
    assert calls == ["example-org/no-such-chat"]
    events = []
    with pytest.raises(ChatUnavailable) as again:
        for event in studio.chat("hi again"):
            events.append(event)
    assert events == []  # not even a "Loading…" notice: the known problem, at once
    assert str(again.value) == str(first.value) and "not downloaded yet" in str(first.value)
    assert calls == ["example-org/no-such-chat"]
    assert studio.status()["chat"]["problem"] == str(first.value)
    assert studio.arbiter.is_idle()


def test_log_lines_are_cut_at_a_word() -> None:
    text = (
        "Cannot load model x: the model is not fully cached locally (Cannot find an appropriate cached snapshot "
        "folder for the specified revision on the local disk and outgoing traffic has been disabled. To enable "
        "repo look-ups and downloads online, pass 'local_files_only=False' as input.) and an error occurred"
    )
    short = _short(OSError(text), limit=200)
    assert short.endswith(" …") and len(short) <= 202
    assert text.startswith(short[:-2]) and text[len(short) - 2] == " "  # cut before a space, not mid-word
    assert _short(OSError("two\nlines")) == "two lines"


def test_warns_at_start_up_when_real_models_have_no_cuda(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    from clair.device import gpu

    monkeypatch.setattr(gpu, "cuda", lambda: False)
    caplog.set_level(logging.WARNING, logger="clair")
    main._warn_without_cuda(Config())
    assert "no CUDA device" in caplog.text and "SG161222/RealVisXL_V5.0" in caplog.text
    caplog.clear()
    main._warn_without_cuda(dataclasses.replace(Config(), demo=True, image_model="tiny", local_chat_model="tiny"))
    assert caplog.text == ""


def test_a_request_that_waited_for_a_failing_preload_gets_its_answer(tmp_path, monkeypatch) -> None:
    from diffusers import StableDiffusionXLPipeline

    calls: list[str] = []
    original = StableDiffusionXLPipeline.from_pretrained
    entered = threading.Event()

    def slow(source, **kwargs):  # the hub client retrying offline, shortened
        calls.append(source)
        entered.set()
        time.sleep(0.3)
        return original(source, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", slow)
    engine = ImageEngine(dataclasses.replace(Config(), image_model="example-org/no-such-sdxl", output_dir=str(tmp_path)))
    errors: list[str] = []

    def load() -> None:
        try:
            engine.load()
        except ImageModelUnavailable as exc:
            errors.append(str(exc))

    preload = threading.Thread(target=load)
    preload.start()
    assert entered.wait(10)
    request = threading.Thread(target=load)
    request.start()
    preload.join(30)
    request.join(30)
    assert len(errors) == 2 and errors[0] == errors[1]
    assert engine.gate.failures == 1  # one attempt, not two: the request took the preload's answer
    assert len(calls) <= 2  # that attempt's fp16 variant and default weights
