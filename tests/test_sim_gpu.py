"""The GPU-path defects a real card would turn into crashes (issue 14), each shown on the simulated card.

Every test runs Clair's real code (Studio, ImageEngine, LocalChat, the `ollama` client against the
stand-in) on a simulated 20 GB card (clair/device/simcard.py) whose figures are its own measured ones. Device
out-of-memory errors are read from the card's file, not from Clair's ledger. Tiny models draw small images
and declare a real render's memory (`pipe.sim_render_size`); the arithmetic stays on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from clair.base.config import Config
from clair.device import card as device
from clair.device import gpu, simcard
from clair.device.simcard import GiB, SimCard
from clair.engines.chat import load_dtype
from clair.engines.image import ImageEngine, RenderParams
from clair.engines.tiny import save_tiny_chat
from clair.service.studio import Studio
from tests.ollama_standin import OllamaStandin
from tests.support import wait_until

MODEL = "llama3.1:8b"


@pytest.fixture
def card(tmp_path):
    path = str(tmp_path / "card.json")
    dev = SimCard(path, total=20 * GiB)
    old = device.install(dev)
    try:
        yield dev
    finally:
        dev.close()
        device.install(old)


def config(tmp_path, card: SimCard, **kw) -> Config:
    base = dict(
        image_model="tiny",
        local_chat_model="tiny",
        chat_backend="local",
        output_dir=str(tmp_path / "out"),
        sim_gpu_gb=20,
        sim_gpu_file=card.path,
        vae="stock",
    )
    return dataclasses.replace(Config(), **{**base, **kw})


def engine(tmp_path, card, as_if=(1024, 1024), **kw) -> ImageEngine:
    eng = ImageEngine(config(tmp_path, card, **kw))
    pipe = eng.load()
    pipe.sim_render_size = as_if  # draws 512², takes a 1024² render's memory on the card
    return eng


def p512(seed=1, steps=2) -> RenderParams:
    return RenderParams("a lighthouse", steps=steps, width=512, height=512, seed=seed)


def other_program(card: SimCard, free_left: float) -> None:
    """Another program takes memory so that `free_left` GiB stay free once our weights and context are on."""
    weights = simcard.FIGURES["sdxl_weights_gib"] * GiB + simcard.FIGURES["context"]
    assert simcard.take(card.path, "other:1", int(20 * GiB - weights - free_left * GiB))


# -- 3: the VAE-tiling fallback that really tiles at 1024² ------------------------------------------------
def test_tiling_fallback_tiles_a_1024_decode(tmp_path, card) -> None:
    """The stock VAE's fp32 decode at 1024² needs 9.1 GiB above the weights; 6 GiB are free. diffusers tiles
    only latents larger than 128 (a 1024² latent is 128): the fallback must lower the tile size, or it repeats
    the same decode and ends in CPU offload."""
    eng = engine(tmp_path, card)
    other_program(card, free_left=6.0)
    _, facts = eng.render(p512())
    assert facts["fallback"] == "vae-tiling"
    assert card.oom_count() == 1
    vae = eng._pipe.vae
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.use_tiling) == (1024, 128, False)  # put back


# -- 4: out of memory outside the caching allocator --------------------------------------------------------
def test_a_first_use_runtime_error_is_healed_as_out_of_memory(tmp_path, card) -> None:
    """Ollama filled the card: the first step's cuBLAS workspace fails as a plain RuntimeError. It is
    out of memory all the same: the engine frees the GPU (on_oom) and retries."""
    eng = engine(tmp_path, card)
    other_program(card, free_left=3.0)
    freed = []

    def on_oom() -> None:
        simcard.give_back(card.path, "other:1")  # what evicting Ollama does
        freed.append(True)

    _, facts = eng.render(p512(), on_oom=on_oom)
    assert freed and facts["fallback"] == "vae-tiling"
    log = simcard.read(card.path)["oom_log"]
    assert len(log) == 1 and log[0]["first_use"] is True
    assert eng.oom_recoveries == 1


# -- 5: the learned footprint ------------------------------------------------------------------------------
def test_learned_footprint_is_not_polluted_and_comes_down(tmp_path, card) -> None:
    eng = engine(tmp_path, card)
    chat = 3 * GiB

    def chat_beside(step, total):  # the in-process chat model generates during the render
        if step == 1:
            gpu.note_activity()
            card.hold("chat", chat)

    eng.render(p512(), on_step=chat_beside)
    card.drop("chat")
    assert eng._per_mpx is None  # a peak shared with the chat model teaches nothing
    gpu.begin_use()  # a chat that generates through the whole render: no mark changes during it
    try:
        eng.render(p512(seed=9))
    finally:
        gpu.end_use()
    assert eng._per_mpx is None

    eng.render(p512(seed=2))
    clean = eng.footprint(512, 512)[0]
    measured = simcard.render_peak(1024, 1024, "stock", decode=True)[1]  # what the card took above the weights
    assert eng._per_mpx == pytest.approx((measured - eng._fixed()) / 0.262144, rel=0.01)

    eng._learned.append(eng._per_mpx * 3)  # a figure that was too large (an older, polluted one)
    eng._per_mpx = max(eng._learned)
    assert eng.footprint(512, 512)[0] > 2 * clean
    for seed in range(3, 8):
        eng.render(p512(seed=seed, steps=1))
    assert eng.footprint(512, 512)[0] == pytest.approx(clean, rel=0.01)  # it came down
    assert card.oom_count() == 0


def test_a_small_drawing_teaches_nothing_about_the_footprint(tmp_path, card) -> None:
    """A 64x64 render's fixed overhead divided by 0.004 megapixels made 512x512 "need" 120 GB: every render
    but tiny ones was refused until a restart (found by attacking the demo)."""
    eng = engine(tmp_path, card)
    before = {size: eng.footprint(size, size)[0] for size in (512, 1024)}
    eng.render(RenderParams("tiny", steps=1, width=64, height=64, seed=1).validated())
    assert eng._per_mpx is None
    assert {size: eng.footprint(size, size)[0] for size in (512, 1024)} == before
    assert card.oom_count() == 0


# -- 6: pinned memory is counted as the pinned allocator rounds it ---------------------------------------
def test_pinned_ram_is_counted_rounded_up() -> None:
    m = torch.nn.Module()
    m.register_buffer("a", torch.zeros(5 * 1024 * 1024, dtype=torch.uint8))  # 5 MiB pins 8 MiB
    m.register_buffer("b", torch.zeros(1024, dtype=torch.uint8))
    assert gpu.module_bytes([m]) == 5 * 1024 * 1024 + 1024
    assert gpu.pinned_footprint([m]) == 8 * 1024 * 1024 + 1024
    locked = gpu.pinned_footprint([m])
    # auto leaves the machine at least as much RAM as it locks: judged on the rounded figure.
    assert not gpu.pinned_allowed("auto", locked, available=2 * gpu.module_bytes([m]) + 1, on_cuda=True)
    assert gpu.pinned_allowed("auto", locked, available=2 * locked, on_cuda=True)


# -- 8: wait_free and other programs' memory ---------------------------------------------------------------
def test_wait_free_does_not_wait_for_memory_another_program_holds(card) -> None:
    assert simcard.take(card.path, "other:1", 12 * GiB)  # for good
    # Knowing what the others hold (the ledger's "other" tenant): no wait at all.
    assert gpu.wait_free(10 * GiB, timeout=30, others=lambda: 12 * GiB) < 1.0
    # Not knowing: it stops once nothing has come back for a while, long before its timeout.
    assert gpu.wait_free(10 * GiB, timeout=30, poll=0.01, settle_s=0.2) < 10


def test_wait_free_waits_for_memory_that_comes(card) -> None:
    assert simcard.take(card.path, "runner:1", 15 * GiB)
    threading.Timer(0.3, simcard.give_back, (card.path, "runner:1")).start()  # a runner that exits late
    gpu.wait_free(10 * GiB, timeout=30, poll=0.01)
    assert card.reading().free >= 10 * GiB


# -- 9: the in-process chat model's dtype --------------------------------------------------------------
def test_chat_model_loads_in_the_dtype_it_was_trained_in(tmp_path) -> None:
    folder = save_tiny_chat(tmp_path / "chat")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for trained, expected in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float16)):
        cfg.pop("torch_dtype", None)
        cfg["dtype"] = trained
        cfg_path.write_text(json.dumps(cfg))
        assert load_dtype(str(folder), on_gpu=True, bf16_ok=True) == expected
    cfg["dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(cfg))
    assert load_dtype(str(folder), on_gpu=True, bf16_ok=False) == torch.float16  # a card without bf16
    assert load_dtype(str(folder), on_gpu=False) == torch.float32


# -- Studio on the card: 1, 2, 10 -----------------------------------------------------------------------
def test_a_paused_render_gives_its_activation_cache_back(tmp_path, card) -> None:
    """Defect 1: the plan counts a paused render at its weights only; the chat granted beside it must find
    the activations' cached blocks given back to the card."""
    studio = Studio(config(tmp_path, card, preempt="always", render_slice_s=0.0))
    studio.image.load()
    studio.local.load()
    at_grant: list[tuple[int, int]] = []
    studio.arbiter.on_event(
        lambda ev, d: at_grant.append((card.reserved(), card.allocated()))
        if ev == "start" and d["kind"] == "chat"
        else None
    )
    chats: list[threading.Thread] = []

    def progress(text: str, frac: float) -> None:
        if text.startswith("Step 1/") and not chats:
            t = threading.Thread(target=lambda: list(studio.chat("hello")))
            chats.append(t)
            t.start()
            wait_until(lambda: any(w["kind"] == "chat" for w in studio.arbiter.status()["waiting"]))

    _, info = studio.render(RenderParams("x", steps=3, width=256, height=256, seed=1), on_progress=progress)
    chats[0].join(60)
    assert info["preemptions"] >= 1 and at_grant
    reserved, allocated = at_grant[0]
    assert reserved == allocated <= studio.image._swap.nbytes  # no cached activations left on the card
    assert card.oom_count() == 0


def test_oom_retry_waits_for_the_memory_the_eviction_frees(tmp_path, card) -> None:
    """Defect 2 (and 4): another program takes 3 GB just as a render starts beside Ollama's model; the first
    step fails. Evicting Ollama frees its memory only after /api/ps has emptied (the runner exits later): the
    retry must wait for it, or it fails the same way and falls through to CPU offload."""
    with OllamaStandin({MODEL: 4.9}, sim_card=card.path, unload_delay=0.05, sim_release_lag=0.5) as standin:
        studio = Studio(config(tmp_path, card, chat_backend="ollama", ollama_host=standin.host, vae="fp16-fix"))
        real = studio.image.footprint
        studio.image.footprint = lambda w, h: real(1024, 1024)
        studio.image.load().sim_render_size = (1024, 1024)
        studio.ollama.warm(MODEL)
        assert standin.loaded() == [MODEL]

        def progress(text: str, frac: float) -> None:
            if text == "Rendering" and not simcard.read(card.path)["procs"].get("other:1"):
                assert simcard.take(card.path, "other:1", 3 * GiB)

        _, info = studio.render(p512(), on_progress=progress)
        assert info["fallback"] == "vae-tiling"
        assert "ollama" in info["evicted"]
        assert card.oom_count() == 1
        simcard.give_back(card.path, "other:1")


def test_other_programs_are_read_without_a_phantom(tmp_path, card) -> None:
    """Defect 10: while a render allocates and frees, the ledger's "other programs" figure stays 0."""
    with OllamaStandin({MODEL: 4.9}, sim_card=card.path) as standin:
        studio = Studio(config(tmp_path, card, chat_backend="ollama", ollama_host=standin.host))
        studio.ollama.sync(studio.arbiter)
        card.hold("weights", 7 * GiB)
        stop = threading.Event()

        def render() -> None:
            while not stop.is_set():
                with card.transient(6 * GiB):
                    pass
                card.empty_cache()

        t = threading.Thread(target=render)
        t.start()
        try:
            seen = []
            for _ in range(200):
                studio._sync_other()
                seen.append(studio.arbiter.resident_bytes("other"))
        finally:
            stop.set()
            t.join()
        assert max(seen) == 0


# -- the stand-in and the tiny chat model on the card ----------------------------------------------------
def test_ollama_standin_loads_onto_the_card_and_frees_after_its_lag(card) -> None:
    import ollama

    with OllamaStandin({MODEL: 4.9}, sim_card=card.path, unload_delay=0.05, sim_release_lag=5.0) as standin:
        client = ollama.Client(host=standin.url)
        client.chat(model=MODEL, messages=[], options={"num_ctx": 4096})
        holders = simcard.read(card.path)["procs"]
        assert list(holders.values()) == [6_200_000_000]  # the stand-in's own table: llama3.1:8b at 4k
        client.chat(model=MODEL, messages=[], keep_alive=0)
        wait_until(lambda: standin.loaded() == [])
        # /api/ps is empty, but the runner has not given its memory back yet.
        assert simcard.read(card.path)["procs"] == holders
        wait_until(lambda: simcard.read(card.path)["procs"] == {}, timeout=20)


def test_ollama_standin_offloads_what_the_card_cannot_hold(card) -> None:
    import ollama

    assert simcard.take(card.path, "other:1", 17 * GiB)
    with OllamaStandin({MODEL: 4.9}, sim_card=card.path) as standin:
        ollama.Client(host=standin.url).chat(model=MODEL, messages=[], options={"num_ctx": 4096})
        (ps,) = standin.ps()
        assert ps["size_vram"] == 3 * GiB < ps["size"]  # the rest on the CPU, as Ollama does
        assert card.oom_count() == 0  # Ollama does not fail, it offloads


def test_tiny_chat_model_takes_its_real_size_on_the_card(tmp_path, card) -> None:
    studio = Studio(config(tmp_path, card))
    reply = "".join(e.text for e in studio.chat("hello") if hasattr(e, "text"))
    assert reply
    held = simcard.FIGURES["chat_weights"]
    assert card.allocated() == held and card.reserved() == held  # weights stay; activations given back
    assert studio.local.footprint()[1] == held
    assert card.peak_reserved() > held  # the forward calls took activations and KV cache on the card
