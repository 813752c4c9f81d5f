"""Out-of-memory self-healing, on CPU: the real tiny SDXL pipeline, wrapped to raise torch.OutOfMemoryError on demand.

A render that runs out of memory lets go of what the failed attempt held, has every other tenant evicted,
retries with VAE tiling, then with model CPU offload, and says which fallback it used; when all fail, the
user gets a clear error and the GPU lease is released.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import pytest
import torch

from clair.base.config import Config
from clair.base.errors import ImageModelUnavailable
from clair.engines.image import ImageEngine, RenderParams
from clair.service.studio import Studio, Token

pytestmark = pytest.mark.usefixtures("offline")


class OomPipe:
    """The real pipeline, except that the calls numbered in `fail` run out of memory while holding a tensor."""

    def __init__(self, pipe, fail: set[int] | None = None, always: bool = False) -> None:
        self._pipe = pipe
        self.fail = fail or set()
        self.always = always
        self.calls = 0
        self.tiling: list[bool] = []  # VAE tiling on at each call
        self.activations: list[weakref.ref] = []  # what each failed call held when it raised

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self.calls += 1
        self.tiling.append(bool(self._pipe.vae.use_tiling))
        if self.always or self.calls in self.fail:
            held = torch.ones(256, 1024)  # stands in for the activations of the failed attempt
            self.activations.append(weakref.ref(held))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self._pipe(**kwargs)


def _params() -> RenderParams:
    return RenderParams("a lighthouse at dusk", steps=2, width=64, height=64, seed=3).validated()


@pytest.fixture
def engine(tmp_path) -> ImageEngine:
    e = ImageEngine(dataclasses.replace(Config(), image_model="tiny", output_dir=str(tmp_path)))
    e.load()
    return e


def _wrap(engine: ImageEngine, **kw) -> OomPipe:
    wrapped = OomPipe(engine._pipe, **kw)
    engine._pipe = wrapped
    return wrapped


def test_first_attempt_out_of_memory_heals_with_vae_tiling_after_freeing_and_evicting(engine) -> None:
    pipe = _wrap(engine, fail={1})
    seen_at_oom: list[bool] = []

    def on_oom() -> None:  # by now the failed attempt's tensors must be gone (not kept by a traceback)
        seen_at_oom.append(all(ref() is None for ref in pipe.activations))

    image, facts = engine.render(_params(), on_oom=on_oom)
    assert image.size == (64, 64)
    assert facts["fallback"] == "vae-tiling"
    assert seen_at_oom == [True]
    assert pipe.tiling == [False, True]
    assert not pipe.vae.use_tiling  # the next render is tried at full quality again
    assert (engine.oom_recoveries, engine.oom_failures) == (1, 0)

    _, facts = engine.render(_params())  # no OOM: no fallback
    assert facts["fallback"] is None and pipe.tiling[-1] is False
    assert engine.oom_recoveries == 1


def test_two_failures_heal_with_model_cpu_offload(engine, caplog: pytest.LogCaptureFixture) -> None:
    pipe = _wrap(engine, fail={1, 2})
    calls: list[int] = []
    caplog.set_level(logging.INFO, logger="clair.engines.image")
    _, facts = engine.render(_params(), on_oom=lambda: calls.append(pipe.calls))
    assert facts["fallback"] == "cpu-offload"
    assert calls == [1]  # the others are evicted once, after the first failure
    assert pipe.tiling == [False, True, False]
    assert "model CPU offload: no CUDA device" in caplog.text  # the CPU path of the fallback ran
    assert engine.oom_recoveries == 1


def test_out_of_memory_with_every_fallback_is_a_clear_error(engine) -> None:
    pipe = _wrap(engine, always=True)
    with pytest.raises(ImageModelUnavailable, match="ran out of memory at 64x64") as err:
        engine.render(_params(), on_oom=lambda: None)
    assert "VAE tiling" in str(err.value) and "nvidia-smi" in str(err.value)
    assert err.value.__context__ is None  # raised outside the except block: no traceback kept alive
    assert pipe.calls == 3
    assert all(ref() is None for ref in pipe.activations)
    assert (engine.oom_recoveries, engine.oom_failures) == (0, 1)
    assert not engine._lock.locked()


# -- through Studio: the arbiter evicts the other tenants, /status counts, the lease is released ----------


def _studio(tmp_path) -> Studio:
    cfg = dataclasses.replace(
        Config(),
        chat_backend="local",
        local_chat_model="tiny",
        image_model="tiny",
        output_dir=str(tmp_path),
        ollama_shares_gpu="no",
        vram_budget_gb=100.0,  # the chat model may stay resident beside a render: the OOM must evict it
        preload=False,
    )
    return Studio(cfg)


def test_studio_evicts_every_idle_tenant_then_reports_the_fallback(tmp_path) -> None:
    studio = _studio(tmp_path)
    assert "".join(e.text for e in studio.chat("hi") if isinstance(e, Token))
    assert [r["tenant"] for r in studio.status()["resident"]] == ["local-chat"]
    evicted: list[str] = []
    real_evict = studio.local.evict
    studio.arbiter._tenants["local-chat"].evict = lambda: (evicted.append("local-chat"), real_evict())
    studio.image.load()
    pipe = _wrap(studio.image, fail={1})

    held: list[tuple] = []
    progress: list[str] = []

    def on_progress(text: str, frac: float) -> None:
        progress.append(text)
        if pipe.calls == 2 and not held:  # during the retry: who is resident, and can a chat get in?
            st = studio.arbiter.status()
            lease = studio.arbiter.request("chat", "local-chat", 10**6, label="chat during the retry")
            held.append(([r["tenant"] for r in st["resident"]], lease.poll(0.05)))
            lease.release()

    _, info = studio.render(_params(), on_progress=on_progress)
    assert info["fallback"] == "vae-tiling"
    assert evicted == ["local-chat"]
    assert held == [(["image"], False)]  # the other tenant left; no chat is let in beside the retry
    assert any("Out of GPU memory" in text for text in progress)
    st = studio.status()
    assert st["stats"]["oom_recoveries"] == 1 and st["stats"]["oom_failures"] == 0
    assert studio.arbiter.is_idle() and st["holders"] == []


def test_studio_failure_releases_the_lease_and_is_counted(tmp_path) -> None:
    studio = _studio(tmp_path)
    studio.image.load()
    _wrap(studio.image, always=True)
    with pytest.raises(ImageModelUnavailable, match="ran out of memory"):
        studio.render(_params())
    assert studio.arbiter.is_idle()
    st = studio.status()
    assert st["stats"]["oom_failures"] == 1 and st["stats"]["oom_recoveries"] == 0
    # and the GPU is usable at once
    studio.image._pipe = studio.image._pipe._pipe
    _, info = studio.render(_params())
    assert info["fallback"] is None


def test_the_summary_under_the_image_names_the_fallback(tmp_path) -> None:
    from clair.adapters import ui

    summary = ui.summary_text
    info = {"seed": 1, "width": 64, "height": 64, "steps": 2, "wait_s": 0, "render_s": 1, "path": "/x/a.png"}
    assert "ran out of memory" not in summary({**info, "fallback": None})
    assert "rendered again with **VAE tiling**" in summary({**info, "fallback": "vae-tiling"})
    assert "rendered again with **model CPU offload**" in summary({**info, "fallback": "cpu-offload"})
