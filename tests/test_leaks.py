"""The smaller leaks of issue 7, each pinned down: the in-process chat's lease outliving generate(), an
uncancellable wait for the chat model, clean-up on Gradio's event loop, per-session cancel flags, and chats
queued behind renders in Gradio's slots."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading

import pytest
import torch
from gradio.utils import SyncToAsyncIterator

from clair.adapters import ui
from clair.base.config import Config
from clair.base.errors import Cancelled
from clair.service.studio import Studio, Token

pytestmark = pytest.mark.usefixtures("offline")


def _studio(tmp_path, **kw) -> Studio:
    cfg = dataclasses.replace(
        Config(),
        chat_backend="local",
        local_chat_model="tiny",
        image_model="tiny",
        output_dir=str(tmp_path),
        ollama_shares_gpu="no",
        preload=False,
        **kw,
    )
    return Studio(cfg)


def _stuck_generate(studio: Studio, release: threading.Event, started: threading.Event):
    """generate() that sends one token, then ignores the stop flag until `release` (a hung GPU kernel)."""

    def generate(**kwargs):
        streamer = kwargs["streamer"]
        streamer.put(kwargs["input_ids"])  # the prompt (skipped)
        streamer.put(torch.tensor([7]))
        started.set()
        release.wait(30)
        streamer.end()

    studio.local.load()
    studio.local._model.generate = generate


class Consumer(threading.Thread):
    """Runs Studio.chat to the end in a thread, recording tokens and the error it ended with."""

    def __init__(self, studio: Studio, stop: threading.Event, stop_after_first: bool = False) -> None:
        super().__init__(daemon=True)
        self.studio, self.stop, self.stop_after_first = studio, stop, stop_after_first
        self.tokens: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.studio.chat("hi", stop=self.stop):
                if isinstance(event, Token):
                    self.tokens.append(event.text)
                    if self.stop_after_first:
                        self.stop.set()
        except BaseException as exc:
            self.error = exc


def test_the_lease_is_held_until_generate_has_really_stopped(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    studio = _studio(tmp_path, stall_s=0.3)
    release, started = threading.Event(), threading.Event()
    _stuck_generate(studio, release, started)
    studio.local.STOP_WARN_S = 0.1  # (30 s in production)
    caplog.set_level(logging.WARNING)
    chat = Consumer(studio, threading.Event(), stop_after_first=True)
    chat.start()
    try:
        assert started.wait(10)
        chat.join(1.0)
        # Asked to stop, generate() still runs: the lease must still be held (the GPU is still in use)...
        assert chat.is_alive()
        assert [h["kind"] for h in studio.arbiter.status()["holders"]] == ["chat"]
        assert "still generating" in caplog.text
        # ...and the watchdog sees the holder making no progress.
        assert not studio.healthy()
        assert "chat:tiny (random weights) has held the GPU without progress" in studio.last_health_problem
    finally:
        release.set()
    chat.join(10)
    assert not chat.is_alive() and chat.error is None
    assert studio.arbiter.is_idle()
    assert studio.healthy()


def test_a_chat_waiting_for_the_model_can_be_cancelled_and_releases_its_lease(tmp_path) -> None:
    studio = _studio(tmp_path)
    release, started = threading.Event(), threading.Event()
    _stuck_generate(studio, release, started)
    first = Consumer(studio, threading.Event())
    first.start()
    try:
        assert started.wait(10)
        second_stop = threading.Event()
        second = Consumer(studio, second_stop)
        second.start()
        # Both chats hold a lease on the same tenant; the second waits for the model, alive (heartbeats).
        second.join(0.5)
        assert second.is_alive()
        assert len(studio.arbiter.status()["holders"]) == 2
        second_stop.set()
        second.join(5)
        assert not second.is_alive(), "the wait for the model lock did not notice the stop flag"
        assert isinstance(second.error, Cancelled)
        assert len(studio.arbiter.status()["holders"]) == 1  # its lease is released, the first's is not
    finally:
        release.set()
    first.join(10)
    assert studio.arbiter.is_idle()


def test_cancel_flags_are_per_job_and_pruned(tmp_path) -> None:
    studio = _studio(tmp_path)
    with studio.cancel_scope("chat:s1") as a, studio.cancel_scope("chat:s1") as b, studio.cancel_scope("chat:s2") as c:
        assert a is not b  # a second job of the same session does not replace the first's flag
        assert studio.cancel_jobs() == 3
        assert studio.cancel("chat:s1") is True
        assert a.is_set() and b.is_set() and not c.is_set()  # Stop stops everything of that session, only
    assert studio.cancel_jobs() == 0 and studio._cancel == {}  # nothing left behind
    assert studio.cancel("chat:s1") is False


def test_gradio_closes_a_handler_without_running_its_clean_up_on_the_event_loop() -> None:
    """Gradio's own SyncToAsyncIterator.aclose() (what it runs on cancel, disconnect and job end)."""
    finish = threading.Event()
    cleanup: list[threading.Thread] = []
    started = threading.Event()

    def handler():
        try:
            yield 1
            yield 2
        finally:
            cleanup.append(threading.current_thread())
            started.set()
            finish.wait(10)  # a blocking clean-up: a thread join, an HTTP call

    async def gradio_side() -> threading.Thread:
        it = SyncToAsyncIterator(ui.close_off_loop(handler)(), None)
        assert await it.__anext__() == 1
        await it.aclose()
        assert not finish.is_set()  # aclose() returned while the clean-up was still blocked
        return threading.current_thread()

    try:
        loop_thread = asyncio.run(gradio_side())
        assert started.wait(5)
        assert cleanup and cleanup[0] is not loop_thread
        assert cleanup[0].name == "clair-cleanup"
    finally:
        finish.set()


def test_a_finished_or_failing_handler_is_not_closed_twice() -> None:
    def ok():
        yield 1

    def failing():
        yield 1
        raise ValueError("boom")

    assert list(ui.close_off_loop(ok)()) == [1]
    gen = ui.close_off_loop(failing)()
    assert next(gen) == 1
    with pytest.raises(ValueError, match="boom"):
        next(gen)


def test_chats_and_renders_have_their_own_gradio_slots(tmp_path) -> None:
    studio = _studio(tmp_path, max_queue=8)  # Gradio slots: the house cap + 4 refusal slots
    demo = ui.build(studio)
    ids: dict[str, set] = {}
    for fn in demo.fns.values():
        name = getattr(fn.fn, "__name__", "")
        if name in ("chat_ui", "chat_api", "render"):
            ids.setdefault(name, set()).add((fn.concurrency_id, fn.concurrency_limit))
            # The GPU handlers are async (the front door, clair/service/front.py): they wait for the GPU on the loop,
            # and Job._drive closes Studio's generators in a worker thread, off the loop.
            assert inspect.isasyncgenfunction(fn.fn) or inspect.iscoroutinefunction(fn.fn), name
    assert ids == {"chat_ui": {("chat", 12)}, "chat_api": {("chat", 12)}, "render": {("render", 12)}}
    # Gradio runs at most max_threads jobs over all ids: full render slots must leave room for every chat.
    assert demo.max_threads >= 12 + 12 + 8
    assert demo._queue.max_thread_count == demo.max_threads
