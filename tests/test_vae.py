"""CLAIR_VAE: which VAE decodes, loaded through the real `AutoencoderKL.from_pretrained` path offline (a tiny
VAE saved to a folder, or laid out as the Hugging Face cache holds a download), the fallback that says so,
and the memory prior each choice gives the ledger."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported (it reads this once)

import dataclasses
import logging
import shutil
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from hypothesis import given
from hypothesis import strategies as st

from clair.arbiter import Arbiter
from clair.base.config import Config
from clair.base.errors import ImageModelUnavailable
from clair.device import gpu
from clair.engines.image import FP16_FIX_VAE, SDXL_WEIGHTS, ImageEngine, RenderParams, read_metadata
from clair.engines.tiny import save_tiny_sdxl, save_tiny_vae
from clair.service.studio import Studio

GiB = 1024**3
pytestmark = pytest.mark.usefixtures("offline")

# What bench/gpu.py measured on an H200 (docs/facts.md): peak memory *reserved* by a render, in GiB,
# weights included, per size, with the stock VAE (fp32 decode) and with the fp16-safe one.
MEASURED_RESERVED_GIB = {
    "stock": {(512, 512): 9.16, (768, 768): 11.82, (1024, 1024): 15.54, (1216, 832): 15.28, (1536, 1536): 26.32},
    "fp16": {(512, 512): 8.10, (768, 768): 9.42, (1024, 1024): 11.35, (1216, 832): 11.21, (1536, 1536): 16.99},
}
# An 8B Q4 chat model at a 4k context as `ollama ps` showed it to a user (llama3.1:8b, 6.5 GB; Ollama issue
# #10801): decimal GB, as Ollama prints sizes.
LLM_8B_LOADED = int(6.5e9)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "sdxl")


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test (Clair reads the cache's place from huggingface_hub)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
    """Lay a saved model out as `hf download` leaves it: refs/main -> snapshots/<commit>/<files>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def _engine(model: str | Path, out: Path, vae: str = "auto") -> ImageEngine:
    return ImageEngine(dataclasses.replace(Config(), image_model=str(model), output_dir=str(out), vae=vae))


def _params(seed: int = 5, size: int = 64) -> RenderParams:
    return RenderParams("a lighthouse at dusk", steps=2, width=size, height=size, seed=seed).validated()


class Spy:
    """Records the calls Clair's own code makes to a classmethod `from_pretrained` (not those diffusers makes
    while it loads a pipeline's components), and lets every call through to the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type):
        self.calls: list[tuple[str, dict]] = []
        self.results: list[object] = []
        original = cls.from_pretrained

        def spy(source, **kwargs):
            ours = sys._getframe(1).f_globals.get("__name__", "").startswith("clair.")
            if ours:
                self.calls.append((str(source), kwargs))
            result = original(source, **kwargs)
            if ours:
                self.results.append(result)
            return result

        monkeypatch.setattr(cls, "from_pretrained", spy)


def _pixels(path_or_image) -> np.ndarray:
    return np.asarray(path_or_image.convert("RGB"))


# -- auto: the fp16-safe VAE when it can be had ------------------------------------------------------------


def test_auto_takes_the_fp16_fix_vae_from_the_hub_cache_and_the_pipeline_never_upcasts_it(
    sdxl_dir: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saved with force_upcast=True on purpose: Clair must still turn the upcast off for this VAE.
    put_in_hub_cache(hub_cache, FP16_FIX_VAE, save_tiny_vae(tmp_path / "vae", fp16_safe=False))
    vaes = Spy(monkeypatch, AutoencoderKL)
    pipes = Spy(monkeypatch, StableDiffusionXLPipeline)
    engine = _engine(sdxl_dir, tmp_path / "out")
    assert engine.footprint(1024, 1024)[0] < 12 * GiB  # in the cache: the fp16 prior even before the load

    image, _ = engine.render(_params())

    ((source, kwargs),) = vaes.calls
    assert source == FP16_FIX_VAE
    assert kwargs["local_files_only"] is True and kwargs["cache_dir"] == str(hub_cache)
    assert kwargs["use_safetensors"] is True and kwargs["dtype"] == (torch.float16 if gpu.cuda() else torch.float32)
    assert all(kw.get("vae") is vaes.results[0] for _, kw in pipes.calls)  # handed to the pipeline
    pipe = engine.load()
    assert pipe.vae is vaes.results[0]
    # diffusers' SDXL pipeline upcasts to fp32 at decode when `vae.config.force_upcast` is true.
    assert pipe.vae.config.force_upcast is False
    assert engine.vae_status() == {"setting": "auto", "using": FP16_FIX_VAE, "fp16_decode": True, "note": None}
    assert "fp16-safe" in engine.vae_line()
    assert read_metadata(engine.save(image, _params()))["vae"] == FP16_FIX_VAE

    # That VAE really decodes: the same latents through the checkpoint's own VAE give other pixels.
    stock, _ = _engine(sdxl_dir, tmp_path / "out2", vae="stock").render(_params())
    assert not np.array_equal(_pixels(image), _pixels(stock))


@pytest.mark.parametrize("vae", ["auto", "stock"])
def test_in_fp16_only_the_stock_vae_is_upcast_to_fp32_to_decode(
    sdxl_dir: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vae: str
) -> None:
    """What a GPU runs (fp16), on the CPU: diffusers moves the stock VAE to fp32 around the decode, and must
    leave the fp16-safe one alone (that upcast is where a render's memory peaks)."""
    put_in_hub_cache(hub_cache, FP16_FIX_VAE, save_tiny_vae(tmp_path / "vae", fp16_safe=False))
    pipe = _engine(sdxl_dir, tmp_path / "out", vae=vae).load().to(torch.float16)
    moves: list[object] = []
    original = pipe.vae.to

    def to(*args: object, **kwargs: object):
        moves.append(kwargs.get("dtype", args[0] if args else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "to", to)
    pipe(prompt="a lighthouse", num_inference_steps=1, width=64, height=64, guidance_scale=1.0)
    assert moves == ([] if vae == "auto" else [torch.float32, torch.float16])


def test_auto_offline_without_the_vae_falls_back_to_the_checkpoints_own_and_says_so(
    sdxl_dir: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    vaes = Spy(monkeypatch, AutoencoderKL)
    cfg = dataclasses.replace(
        Config(), image_model=str(sdxl_dir), output_dir=str(tmp_path / "out"), chat_backend="local",
        local_chat_model="tiny",
    )  # fmt: skip
    studio = Studio(cfg)
    with caplog.at_level(logging.WARNING, logger="clair.engines.image"):
        image, _ = studio.image.render(_params())
    assert image.size == (64, 64)
    assert vaes.calls == []  # offline and not cached: not even tried
    note = studio.image.vae_status()["note"]
    assert FP16_FIX_VAE in note and "offline" in note and "CLAIR_VAE=stock" in note
    assert any(note in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert studio.status()["image"]["vae"] == {
        "setting": "auto", "using": "checkpoint", "fp16_decode": False, "note": note,
    }  # fmt: skip
    assert studio.image.vae_line() == f"⚠️ {note}"
    assert studio.image.problem() is None  # a notice, not a failure: renders go on
    assert studio.image.load().vae.config.force_upcast is True  # the checkpoint's own, untouched
    assert studio.image.footprint(1024, 1024)[0] > MEASURED_RESERVED_GIB["stock"][(1024, 1024)] * GiB


def test_auto_tries_the_hub_when_online_and_falls_back_when_it_cannot_be_reached(
    sdxl_dir: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:  # the network is down: no route to the hub
        attempts.append(args)
        raise ConnectionRefusedError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # The hub client retries a refused connection 5 times, waiting 1+2+4+8+8 s: ~24 s a user without a
    # network (and without HF_HUB_OFFLINE) waits once, in the background preload. The test skips the waits.
    import huggingface_hub.utils._http as hub_http

    waits: list[float] = []
    monkeypatch.setattr(hub_http, "time", types.SimpleNamespace(sleep=waits.append))
    vaes = Spy(monkeypatch, AutoencoderKL)
    engine = _engine(sdxl_dir, tmp_path / "out")

    image, _ = engine.render(_params())

    assert image.size == (64, 64)
    ((source, kwargs),) = vaes.calls
    assert source == FP16_FIX_VAE and "local_files_only" not in kwargs  # a real download attempt
    assert attempts, "the hub was never asked"
    assert "could not be loaded" in engine.vae_note and FP16_FIX_VAE in engine.vae_note
    assert engine.vae_status()["using"] == "checkpoint" and not engine.vae_status()["fp16_decode"]


def test_fp16_fix_asked_for_explicitly_fails_clearly_and_recovers_once_it_is_there(
    sdxl_dir: Path, hub_cache: Path, tmp_path: Path
) -> None:
    engine = _engine(sdxl_dir, tmp_path / "out", vae="fp16-fix")
    assert engine.footprint(1024, 1024)[0] < 12 * GiB  # declared before the load
    with pytest.raises(ImageModelUnavailable) as err:
        engine.render(_params())
    message = str(err.value)
    assert FP16_FIX_VAE in message and "CLAIR_VAE" in message and "\n" not in message
    assert engine.problem() == message and not engine._lock.locked()

    put_in_hub_cache(hub_cache, FP16_FIX_VAE, save_tiny_vae(tmp_path / "vae"))
    image, _ = engine.render(_params())
    assert image.size == (64, 64) and engine.problem() is None
    assert engine.vae_status()["using"] == FP16_FIX_VAE


# -- stock, and a VAE of one's own ---------------------------------------------------------------------------


def test_stock_keeps_the_checkpoints_vae_even_when_the_fp16_fix_is_cached(
    sdxl_dir: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_in_hub_cache(hub_cache, FP16_FIX_VAE, save_tiny_vae(tmp_path / "vae"))
    vaes = Spy(monkeypatch, AutoencoderKL)
    pipes = Spy(monkeypatch, StableDiffusionXLPipeline)
    engine = _engine(sdxl_dir, tmp_path / "out", vae="stock")
    engine.render(_params())
    assert vaes.calls == [] and all("vae" not in kw for _, kw in pipes.calls)
    assert engine.vae_status() == {"setting": "stock", "using": "checkpoint", "fp16_decode": False, "note": None}
    assert engine.footprint(1024, 1024)[0] > MEASURED_RESERVED_GIB["stock"][(1024, 1024)] * GiB


@pytest.mark.parametrize("fp16_safe", [True, False])
def test_a_local_vae_folder_is_loaded_and_its_config_decides_the_prior(
    sdxl_dir: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp16_safe: bool
) -> None:
    folder = save_tiny_vae(tmp_path / "my-vae", fp16_safe=fp16_safe)
    vaes = Spy(monkeypatch, AutoencoderKL)
    engine = _engine(sdxl_dir, tmp_path / "out", vae=str(folder))
    kind = "fp16" if fp16_safe else "stock"
    declared = engine.footprint(1024, 1024)[0]  # read from its config.json before any weights are loaded
    engine.render(_params())
    ((source, _),) = vaes.calls
    assert source == str(folder)
    assert engine.load().vae is vaes.results[0]
    assert engine.load().vae.config.force_upcast is (not fp16_safe)  # its own setting is respected
    assert engine.vae_status()["fp16_decode"] is fp16_safe
    assert engine.footprint(1024, 1024)[0] == declared
    assert (declared < 12 * GiB) is fp16_safe, kind


def test_a_pipeline_folder_lends_its_vae(sdxl_dir: Path, hub_cache: Path, tmp_path: Path) -> None:
    """CLAIR_VAE may name another diffusers pipeline folder: its vae/ is used."""
    engine = _engine(sdxl_dir, tmp_path / "out", vae=str(sdxl_dir))
    engine.render(_params())
    assert engine.vae_status()["using"] == str(sdxl_dir)


def test_bad_vae_folders_are_explained(sdxl_dir: Path, hub_cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vae"
    with pytest.raises(ImageModelUnavailable, match=r"does not exist.*CLAIR_VAE"):
        _engine(sdxl_dir, tmp_path / "out", vae=str(missing)).render(_params())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageModelUnavailable, match=r"no config.json.*CLAIR_VAE"):
        _engine(sdxl_dir, tmp_path / "out", vae=str(empty)).render(_params())
    with pytest.raises(ImageModelUnavailable, match=r"example-org/no-such-vae.*CLAIR_VAE"):
        _engine(sdxl_dir, tmp_path / "out", vae="example-org/no-such-vae").render(_params())


# -- the tiny pipeline: its own VAE, the footprint CLAIR_VAE declares ----------------------------------------


def test_tiny_keeps_its_own_vae_and_declares_the_footprint_clair_vae_asks_for(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "cuda", lambda: False)
    vaes = Spy(monkeypatch, AutoencoderKL)
    images = {}
    needs = {}
    for vae in ("auto", "fp16-fix", "stock"):
        engine = _engine("tiny", tmp_path / vae, vae=vae)
        images[vae], _ = engine.render(_params(seed=3))
        needs[vae] = engine.footprint(1024, 1024)[0]
        assert engine.vae_status()["using"] == "tiny"
        assert ("fp16-safe" in engine.vae_line()) is (vae != "stock")
    assert vaes.calls == []  # nothing loaded, nothing downloaded
    assert np.array_equal(_pixels(images["auto"]), _pixels(images["stock"]))  # the same pipeline decodes
    assert needs["auto"] == needs["fp16-fix"] < needs["stock"]


# -- the prior per VAE kind, against the measurements ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["stock", "fp16"])
def test_the_prior_covers_every_measured_size_without_wasting_much(
    kind: str, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "cuda", lambda: False)
    engine = _engine("tiny", tmp_path, vae={"stock": "stock", "fp16": "fp16-fix"}[kind])
    for (w, h), measured in MEASURED_RESERVED_GIB[kind].items():
        need, idle = engine.footprint(w, h)
        assert idle == SDXL_WEIGHTS
        assert measured * GiB <= need <= measured * 1.1 * GiB, (w, h, need / GiB, measured)


def test_on_the_seed_card_only_the_stock_vae_needs_the_llm_gone(hub_cache: Path, tmp_path: Path) -> None:
    """20 GiB, an 8B model resident: a 1024² render fits beside it with the fp16-safe VAE, not with the stock one."""
    for vae, evicts in (("fp16-fix", []), ("stock", ["ollama"])):
        engine = _engine("tiny", tmp_path, vae=vae)
        arbiter = Arbiter(policy="budget", budget_bytes=20 * GiB)
        gone: list[str] = []
        arbiter.add_tenant("ollama", lambda gone=gone: gone.append("ollama"))
        arbiter.add_tenant("image", lambda gone=gone: gone.append("image"))
        arbiter.set_resident("ollama", LLM_8B_LOADED)
        need, idle = engine.footprint(1024, 1024)
        with arbiter.lease("render", "image", need, idle) as lease:
            assert list(lease.evicted) == evicts, vae
        assert gone == evicts


@given(
    w=st.integers(8, 256).map(lambda n: n * 8),
    h=st.integers(8, 256).map(lambda n: n * 8),
    dw=st.integers(0, 64).map(lambda n: n * 8),
)
def test_priors_grow_with_the_image_and_the_fp16_safe_vae_always_needs_less(w: int, h: int, dw: int) -> None:
    from clair.engines.image import PRIORS

    mpx, bigger = w * h / 1e6, (w + dw) * h / 1e6
    for prior in PRIORS.values():
        assert SDXL_WEIGHTS < prior.need(SDXL_WEIGHTS, mpx) <= prior.need(SDXL_WEIGHTS, bigger)
    assert PRIORS["fp16"].need(SDXL_WEIGHTS, mpx) < PRIORS["stock"].need(SDXL_WEIGHTS, mpx)
