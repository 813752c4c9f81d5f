"""The image engine: an SDXL pipeline (RealVisXL by default) through diffusers, and the PNGs it keeps.

Loading goes through `StableDiffusionXLPipeline.from_pretrained` for a hub id or a local diffusers
folder (the tests save a tiny pipeline to a folder and load it through this same code); `tiny` builds
a random-weight pipeline in code for the demo. Loading is lazy (first render, under the arbiter) and
retried after a failure, so fixing the cause is enough to recover.

The VAE follows CLAIR_VAE (`_load_vae`): by default the fp16-safe `madebyollin/sdxl-vae-fp16-fix`, loaded
with `AutoencoderKL.from_pretrained` and handed to the pipeline, which then decodes without the stock VAE's
fp32 upcast; when it cannot be had, the checkpoint's own VAE, and the Image tab and /status say so. The
memory a render declares to the arbiter follows the VAE (`PRIORS`; figures and sources in docs/facts.md).

This module does not decide when to use the GPU: callers hold an arbiter lease around `render()`.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import random
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clair.base.config import Config
from clair.base.errors import BadRequest, Cancelled, ImageModelUnavailable, load_failure
from clair.base.helpers import private_dir, write_private
from clair.device import gpu
from clair.device.card import is_out_of_memory
from clair.engines.base import Engine
from clair.engines.loadgate import LoadGate, source_fingerprint

log = logging.getLogger("clair.engines.image")
GiB = 1024**3

# --- VAE choice and the render's memory prior (CLAIR_VAE) ---------------------------------------------------
# What a render needs on the GPU before one has been measured, per VAE kind. Measured by this project's
# bench/gpu.py on an H200 (random-weight SDXL with RealVisXL's shapes, 4 steps, CFG 7, batch 1; weights
# 6.46 GiB); the table and the fit are in docs/facts.md, "SDXL's memory per render". The stock SDXL VAE is
# upcast to fp32 to decode (diffusers' `force_upcast`): 15.54 GiB reserved at 1024². The fp16-safe VAE
# decodes in fp16: 11.35 GiB reserved (8.99 allocated). Each prior lies at or above every measured size, and
# the fp16-safe one below the stock one at every size.
SDXL_WEIGHTS = int(6.46 * GiB)
# The SDXL VAE's own weights in fp16: 0.17 GB of SDXL's 6.94 GB (docs/facts.md, "Swapping weights"). What stays
# on the GPU for a render's tail, the decode, once the UNet and text encoders have left.
SDXL_VAE_WEIGHTS = int(0.17e9)
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"


LEARN_MIN_MPX = 0.25  # the footprint is learned from renders of 512x512 and larger only


@dataclass(frozen=True)
class RenderPrior:
    """weights + activations (allocated) + fragmentation (reserved but not allocated), each a + b x megapixels."""

    act_gib: float
    act_gib_per_mpx: float
    frag_gib: float
    frag_gib_per_mpx: float

    def need(self, weights: int, mpx: float) -> int:
        act = self.act_gib + self.act_gib_per_mpx * mpx
        frag = self.frag_gib + self.frag_gib_per_mpx * mpx
        return int(weights + (act + frag) * GiB)


PRIORS = {
    # measured (reserved above the weights): 2.70 GiB at 512², 5.36 at 768², 9.08 at 1024², 19.86 at 1536²
    "stock": RenderPrior(act_gib=0.3, act_gib_per_mpx=4.8, frag_gib=0.2, frag_gib_per_mpx=4.2),
    # measured: 1.64 GiB at 512², 2.96 at 768², 4.89 at 1024², 10.53 at 1536²
    "fp16": RenderPrior(act_gib=0.15, act_gib_per_mpx=2.3, frag_gib=0.35, frag_gib_per_mpx=2.1),
}


def hub_offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    import huggingface_hub.constants

    return str(huggingface_hub.constants.HF_HUB_CACHE)


def vae_in_cache(repo_id: str) -> bool:
    """Is this hub VAE complete in the local Hugging Face cache? Reads the cache folder only: no network."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        if not isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache), str):
            return False
    return True


MAX_SEED = 2**32 - 1
# Tried in this order after an out-of-memory error (see ImageEngine.render).
FALLBACKS = ("vae-tiling", "cpu-offload")


@dataclass(frozen=True)
class RenderParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.0
    width: int = 1024
    height: int = 1024
    seed: int = -1

    def validated(self, cfg: Config | None = None) -> RenderParams:
        """Checked against the limits in `cfg` (default: the default settings) and normalised (a random
        seed is drawn for -1). Raises BadRequest that says what to fix. Never trusts a type: every field
        is converted from what a client could send (strings, numbers; nothing else)."""
        from clair.service import limits

        cfg = cfg or Config()
        prompt = limits.check_prompt(self.prompt, cfg)
        negative = limits.check_prompt(self.negative_prompt, cfg, "negative prompt")
        if not prompt.strip():
            raise BadRequest("Write a prompt first: describe the image you want.")
        side = cfg.max_side
        sizes = {}
        for name, value in (("width", self.width), ("height", self.height)):
            x = limits.number(value, name)
            if int(x) != x or not 64 <= x <= side or int(x) % 8:
                raise BadRequest(f"{name} must be a multiple of 8 from 64 to {side} (got {value}; CLAIR_MAX_SIDE).")
            sizes[name] = int(x)
        steps = limits.number(self.steps, "steps")
        if int(steps) != steps or not 1 <= steps <= cfg.max_steps:
            raise BadRequest(f"steps must be a whole number from 1 to {cfg.max_steps} (got {self.steps}; CLAIR_MAX_STEPS).")
        guidance = limits.number(self.guidance, "guidance")
        if not cfg.min_guidance <= guidance <= cfg.max_guidance:
            raise BadRequest(
                f"guidance must be from {cfg.min_guidance:g} to {cfg.max_guidance:g} (got {self.guidance}; "
                "CLAIR_MIN_GUIDANCE, CLAIR_MAX_GUIDANCE)."
            )
        seed_x = limits.number(self.seed, "seed")
        if int(seed_x) != seed_x:
            raise BadRequest(f"seed must be a whole number (got {self.seed}).")
        seed = int(seed_x)
        if seed < -1 or seed > cfg.max_seed:
            raise BadRequest(
                f"seed must be -1 (random) or from 0 to {cfg.max_seed} (got {self.seed}; CLAIR_MAX_SEED)."
            )
        if seed == -1:
            seed = random.randint(0, cfg.max_seed)
        return RenderParams(
            prompt.strip(), negative.strip(), int(steps), float(guidance), sizes["width"], sizes["height"], seed
        )


class ImageEngine(Engine):
    name = "image"
    tenant = "image"
    # Learn the footprint from measured peaks. Off only where the drawing is smaller than the size the card
    # is told to account (the benchmark and the soak: tiny 64² drawings that take a 1024² render's memory).
    learns = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model_id = cfg.image_model
        self.output_dir = Path(cfg.output_dir).expanduser().resolve()
        self._lock = threading.Lock()  # guards loading; a pipeline also never runs two calls at once
        self._pipe = None
        self._swap: gpu.WeightSwap | None = None
        self._vae_swap: tuple[object, gpu.WeightSwap] | None = None  # (pipeline, the VAE alone), for the tail
        self._vae_on = False  # the tail put the VAE alone on the GPU (it leaves again after the decode)
        # A failed load is remembered: requests get its reason at once until a re-check (see clair/engines/loadgate.py).
        self.gate = LoadGate(
            lambda: source_fingerprint(self.model_id, "model_index.json") + self._vae_fingerprint()
        )
        self._per_mpx: float | None = None  # learned from renders measured on the device
        # The last clean measurements (bytes per megapixel): the learned figure is their largest, so a
        # figure that was too large gives way after a few renders instead of standing forever.
        self._learned: deque[float] = deque(maxlen=5)
        self.oom_recoveries = 0  # renders that ran out of memory and then succeeded with a fallback
        self.oom_failures = 0  # renders that ran out of memory with every fallback
        # The VAE (CLAIR_VAE): which prior the ledger uses ("fp16" or "stock"), what decodes, and a fallback
        # the user should hear about. Before the first load this is what the load is expected to pick.
        self.vae_kind = self._expected_vae_kind()
        self.vae_source = ""  # after a load: FP16_FIX_VAE, "checkpoint" (its own), CLAIR_VAE's folder/id, or "tiny"
        self.vae_note: str | None = None
        self._owners: dict[tuple[str, float], str | None] = {}  # (file name, mtime) -> owner, for recent()

    @property
    def label(self) -> str:
        return "tiny (random weights)" if self.model_id == "tiny" else self.model_id

    def problem(self) -> str | None:
        """Why the model cannot be loaded, until a load succeeds (None when it loaded or was not tried yet)."""
        return self.gate.problem

    # -- memory ------------------------------------------------------------------------------------
    def to_load(self, width: int, height: int) -> int:
        """What a render of this size will still take on the card: its activations and decode, and its
        weights when they are on the host now (a pause, an eviction: the render restores them first)."""
        need, idle = self.footprint(width, height)
        on_card = self._swap is not None and getattr(self._swap, "on_gpu", True)
        return need - idle if on_card else need

    def footprint(self, width: int, height: int) -> tuple[int, int]:
        """(bytes while rendering at width x height, bytes while idle) on the GPU.

        Without a device the ledger uses SDXL's declared sizes whatever the pipeline, so the policy behaves
        (and shows) as it would on a real card.
        """
        weights = self._swap.nbytes if (self._swap is not None and gpu.present()) else SDXL_WEIGHTS
        mpx = width * height / 1e6
        if self._per_mpx is not None:  # measured, with 10% margin, above the prior's fixed part
            return int(weights + (self._fixed() + self._per_mpx * mpx) * 1.1), weights
        return PRIORS[self.vae_kind].need(weights, mpx), weights  # per VAE kind; see the table above

    def decode_footprint(self, width: int, height: int) -> int:
        """Bytes a render's tail needs: the VAE decode at width x height once the UNet and text encoders left.

        The render's peak less the weights that left. The peak at 1024² and above is the decode's (the H200
        measurement, read in docs/performance.md, "The decode's peak per resolution and VAE": tiling the decode
        brings a 1536² render's peak down to the 1024² one), so this is the decode's peak or above it.
        """
        need, weights = self.footprint(width, height)
        vae = SDXL_VAE_WEIGHTS
        if self._pipe is not None and gpu.cuda() and getattr(self._pipe, "vae", None) is not None:
            vae = gpu.module_bytes([self._pipe.vae])
        return max(vae, need - max(0, weights - vae))

    # -- loading -----------------------------------------------------------------------------------
    def needs_load(self) -> bool:
        return self._pipe is None

    def load(self):
        """The pipeline, loaded into host memory now if need be. Raises ImageModelUnavailable with what to do:
        at once while an earlier failure is known and not due for a re-check (clair/engines/loadgate.py)."""
        if self._pipe is not None:
            return self._pipe  # loaded: don't block behind a render that holds the lock
        known = self.gate.blocked(recheck=self._load_now)
        if known:
            raise ImageModelUnavailable(known)
        return self._load_now()

    def _load_now(self):
        tried = self.gate.failures
        with self._lock:
            if self._pipe is None and self.gate.failures > tried and self.gate.problem:
                # Another load (the preload, a re-check) failed while we waited for it: that is the answer.
                raise ImageModelUnavailable(self.gate.problem)
            return self._load_locked()

    def _load_locked(self):
        if self._pipe is not None:
            return self._pipe
        t0 = time.monotonic()
        try:
            pipe = self._build()
        except Exception as exc:
            if isinstance(exc, ImageModelUnavailable):
                problem = str(exc)
            else:
                problem = load_failure("image model", self.model_id, exc, "CLAIR_IMAGE_MODEL")
            self.gate.failed_loading(problem, exc, "image model", self.model_id, log)
            raise ImageModelUnavailable(problem) from None
        pipe.set_progress_bar_config(disable=True)
        modules = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
        self._swap = gpu.WeightSwap([m for m in modules if m is not None], self.cfg.pinned_offload)
        self._swap.prepare()
        self._pipe = pipe
        self.gate.succeeded()
        log.info(
            "image model loaded model=%s s=%.2f gib=%.2f", self.model_id, time.monotonic() - t0, self._swap.nbytes / GiB
        )
        return pipe

    def _build(self):
        if self.model_id == "tiny":
            from clair.engines.tiny import build_tiny_sdxl

            # The tiny pipeline keeps its own VAE; the declared footprint follows CLAIR_VAE (see _expected_vae_kind).
            self.vae_kind, self.vae_note = self._expected_vae_kind(), None
            self.vae_source = "tiny"
            pipe = build_tiny_sdxl()
            # Decoded as the VAE the ledger counts would be (an fp32 upcast for "stock"): on CPU in fp32
            # it changes nothing, and a device sees the decode's memory that CLAIR_VAE implies.
            pipe.vae.register_to_config(force_upcast=self.vae_kind == "stock")
            return pipe
        import torch
        from diffusers import StableDiffusionXLPipeline

        source = self.model_id
        local = Path(source).expanduser()
        if local.exists():
            if not (local / "model_index.json").exists():
                raise ImageModelUnavailable(
                    f"{local} is not a diffusers folder (no model_index.json). Point CLAIR_IMAGE_MODEL at the folder "
                    "that holds model_index.json, unet/, vae/, text_encoder/..."
                )
            source = str(local)
        elif source.startswith(("/", "./", "~")) or re.match(r"^[A-Za-z]:\\", source):
            raise ImageModelUnavailable(f"The image model folder {source} does not exist. Check CLAIR_IMAGE_MODEL.")
        dtype = torch.float16 if gpu.cuda() else torch.float32
        kwargs = {"dtype": dtype, "use_safetensors": True}
        vae = self._load_vae(dtype)
        if vae is not None:
            kwargs["vae"] = vae
        try:
            # fp16 variant files are half the download and what a GPU runs; a local folder may lack them.
            return StableDiffusionXLPipeline.from_pretrained(source, variant="fp16", **kwargs)
        except (OSError, ValueError) as exc:
            log.info("no fp16 variant (%s); loading the default weights", _short(exc))
            return StableDiffusionXLPipeline.from_pretrained(source, **kwargs)

    # -- the VAE (CLAIR_VAE) ---------------------------------------------------------------------------
    def _vae_fingerprint(self) -> tuple:
        """What loading the VAE depends on (see clair/engines/loadgate.py): a fixed VAE that appears in the cache or
        a folder lets the next render try again at once."""
        setting = self.cfg.vae.strip()
        low = setting.lower()
        if low == "stock":
            return ()
        return source_fingerprint(FP16_FIX_VAE if low in ("auto", "fp16-fix") else setting, "config.json")

    def _expected_vae_kind(self) -> str:
        """The prior a render gets before the first load has said which VAE decodes. Fails closed: "stock"
        (the larger) unless the fp16-safe VAE is asked for, or is sure to be found."""
        setting = self.cfg.vae.strip()
        low = setting.lower()
        if low == "stock":
            return "stock"
        if low == "fp16-fix":
            return "fp16"
        if low == "auto":
            # The demo shows what a real card decides when auto finds the fp16-safe VAE (the usual case).
            return "fp16" if self.model_id == "tiny" or vae_in_cache(FP16_FIX_VAE) else "stock"
        config = _vae_config(setting)
        return "stock" if config is None or config.get("force_upcast", True) else "fp16"

    def _load_vae(self, dtype):
        """The VAE to hand to the pipeline (None: the checkpoint's own). Records what decodes, and why."""
        setting = self.cfg.vae.strip()
        low = setting.lower()
        if low == "stock":
            self.vae_kind, self.vae_source, self.vae_note = "stock", "checkpoint", None
            return None
        if low in ("auto", "fp16-fix"):
            cached = vae_in_cache(FP16_FIX_VAE)
            if low == "auto" and not cached and hub_offline():
                return self._vae_fallback("is not in the Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE)")
            try:
                vae = self._vae_from_pretrained(FP16_FIX_VAE, dtype, local_files_only=cached)
            except Exception as exc:
                if low == "auto":
                    log.info("fp16-fix VAE unavailable", exc_info=True)
                    return self._vae_fallback(f"could not be loaded ({_short(exc)})")
                log.exception("VAE load failed vae=%s", FP16_FIX_VAE)
                raise ImageModelUnavailable(load_failure("VAE", FP16_FIX_VAE, exc, "CLAIR_VAE")) from None
            # It decodes in fp16 without NaNs (its model card): never let the pipeline upcast it to fp32.
            vae.register_to_config(force_upcast=False)
            self.vae_source, self.vae_note = FP16_FIX_VAE, None
        else:
            vae = self._custom_vae(setting, dtype)
            self.vae_source, self.vae_note = setting, None
        self.vae_kind = "stock" if vae.config.force_upcast else "fp16"
        log.info("VAE loaded vae=%s fp16_decode=%s", self.vae_source, self.vae_kind == "fp16")
        return vae

    def _custom_vae(self, setting: str, dtype):
        local = Path(setting).expanduser()
        if local.exists():
            folder = _vae_folder(local)
            if folder is None:
                raise ImageModelUnavailable(
                    f"{local} holds no VAE (no config.json, nor vae/config.json). Point CLAIR_VAE at the folder that "
                    "holds the VAE's config.json and diffusion_pytorch_model.safetensors, or use auto or stock."
                )
            source = str(folder)
        elif setting.startswith(("/", "./", "~")) or re.match(r"^[A-Za-z]:\\", setting):
            raise ImageModelUnavailable(f"The VAE folder {setting} does not exist. Check CLAIR_VAE (or use auto or stock).")
        else:
            source = setting
        try:
            return self._vae_from_pretrained(source, dtype)
        except Exception as exc:
            log.exception("VAE load failed vae=%s", setting)
            raise ImageModelUnavailable(load_failure("VAE", setting, exc, "CLAIR_VAE")) from None

    @staticmethod
    def _vae_from_pretrained(source: str, dtype, local_files_only: bool = False):
        from diffusers import AutoencoderKL

        kwargs = {"dtype": dtype, "use_safetensors": True}
        if local_files_only:
            kwargs |= {"local_files_only": True, "cache_dir": hub_cache_dir()}
        elif not Path(source).exists():
            kwargs["cache_dir"] = hub_cache_dir()
        return AutoencoderKL.from_pretrained(source, **kwargs)

    def _vae_fallback(self, reason: str) -> None:
        self.vae_kind, self.vae_source = "stock", "checkpoint"
        self.vae_note = (
            f"Renders use the checkpoint's own VAE, decoded in fp32: about 4 GiB more GPU memory at 1024², so the "
            f"chat model may be unloaded for each render. The fp16-safe VAE {FP16_FIX_VAE} {reason}. Connect once "
            f"to download it (or run `hf download {FP16_FIX_VAE}`), or set CLAIR_VAE=stock to choose this on purpose."
        )
        log.warning("VAE fallback: %s", self.vae_note)
        return None

    def vae_status(self) -> dict:
        """For /status: what CLAIR_VAE asked for, what decodes (empty until loaded), and the prior's kind."""
        return {
            "setting": self.cfg.vae,
            "using": self.vae_source,
            "fp16_decode": self.vae_kind == "fp16",
            "note": self.vae_note,
        }

    def vae_line(self) -> str:
        """One sentence for the Image tab."""
        if self.vae_note:
            return f"⚠️ {self.vae_note}"
        if self.vae_source == "tiny":
            return f"VAE: the tiny model's own; the GPU budget counts {_KIND_WORDS[self.vae_kind]} memory (CLAIR_VAE)."
        if not self.vae_source:
            return f"VAE: {self.cfg.vae} (CLAIR_VAE), chosen at the first load."
        name = "the checkpoint's own" if self.vae_source == "checkpoint" else self.vae_source
        how = "fp16-safe: no fp32 upcast to decode" if self.vae_kind == "fp16" else "upcast to fp32 to decode"
        return f"VAE: {name} ({how})."

    # -- swaps (called by the arbiter) ---------------------------------------------------------------
    def release_cache(self) -> None:
        """At a pause: give the cached activation blocks back to the card, as the ledger counts a paused render
        at its weights only (a chat planned beside it must find that memory free)."""
        gpu.empty_cache()
        gpu.note_activity()

    def _fixed(self) -> float:
        """Bytes a render needs above the weights whatever its size (the prior's fixed part)."""
        prior = PRIORS[self.vae_kind]
        return (prior.act_gib + prior.frag_gib) * GiB

    def restore(self) -> float:
        """Weights back on the GPU (a render resuming after a pause). Seconds taken; 0 if they never left."""
        self._end_tail()
        return self._swap.restore() if self._swap is not None else 0.0

    def evict(self) -> None:
        self._end_tail()
        if self._swap is not None:
            dt = self._swap.evict()
            log.debug("image pipeline evicted s=%.3f", dt)

    def _drop_denoisers(self, pipe) -> float:
        """A render's tail: the UNet and text encoders leave the GPU before the VAE decode. Seconds taken.

        Every weight leaves by the pinned swap (a pointer swap), then the VAE alone (0.17 GB) comes back from
        a host copy of its own; `_end_tail` takes it off again after the decode. Only a real `WeightSwap`
        moves anything: without a device the weights were never on one.
        """
        t0 = time.monotonic()
        swap = self._swap
        if not isinstance(swap, gpu.WeightSwap) or not swap.active or getattr(pipe, "vae", None) is None:
            return 0.0
        if self._vae_swap is None or self._vae_swap[0] is not pipe:
            self._vae_swap = (pipe, gpu.WeightSwap([pipe.vae], self.cfg.pinned_offload, device=swap.device))
        swap.evict()
        self._vae_on = True  # before the copy: a restore that fails half-way is rolled back by _end_tail
        self._vae_swap[1].restore()
        return time.monotonic() - t0

    def _end_tail(self) -> None:
        """The VAE that a render's tail put on the GPU alone leaves it (after the decode, or an error)."""
        if self._vae_on and self._vae_swap is not None:
            self._vae_on = False
            self._vae_swap[1].evict()

    # -- rendering -----------------------------------------------------------------------------------
    def render(
        self,
        params: RenderParams,
        on_step: Callable[[int, int], None] = lambda step, total: None,
        cancelled: Callable[[], bool] = lambda: False,
        checkpoint: Callable[[int, int], None] = lambda step, total: None,
        on_oom: Callable[[], None] | None = None,
        tail: Callable[[Callable[[], float]], None] | None = None,
    ) -> tuple[Image.Image, dict]:
        """Render on the GPU the caller's lease holds. Returns the image and timings/memory facts.

        `checkpoint(step, total)` runs between denoising steps, after the cancel check: it may block while
        the render is paused for a chat (Studio.render). Everything the denoising loop carries (latents,
        the scheduler's position, the generator, the prompt embeddings) stays in this call meanwhile, so a
        paused render gives the very same image; only the weights may leave the GPU (see `restore`).

        Out of memory, it heals itself (facts["fallback"] says how): it lets go of everything the failed
        attempt held, asks `on_oom()` to evict every other tenant from the GPU, and tries again with VAE
        tiling, then with model CPU offload. Only when all three fail does it raise, with what to do.

        `tail(drop)` runs once the denoising loop is done, before the VAE decode: calling `drop()` takes the
        UNet and text encoders off the GPU (`_drop_denoisers`), so the caller can give their room away.
        """
        self.load()  # at once with the known problem while a load failure stands
        with self._lock:
            pipe = self._load_locked()
            assert self._swap is not None
            for attempt, fallback in enumerate((None, *FALLBACKS)):
                out_of_memory = False
                try:
                    image, facts = self._render_once(pipe, params, on_step, cancelled, checkpoint, fallback, tail)
                except Exception as exc:
                    # torch.OutOfMemoryError, and a plain RuntimeError for memory CUDA could not give outside
                    # the caching allocator (cuBLAS/cuDNN workspaces at a first use): docs/facts.md.
                    if not is_out_of_memory(exc):
                        raise
                    # Only a flag here: raising (or retrying) inside `except` keeps the traceback, and with it
                    # every frame's activations, alive until the block ends.
                    out_of_memory = True
                    log.warning(
                        "render out of memory size=%sx%s fallback=%s: %s",
                        params.width,
                        params.height,
                        fallback or "none",
                        _short(exc),
                    )
                if not out_of_memory:
                    break
                # Outside the except block: the failed attempt's frames are gone; give their memory back.
                gc.collect()
                gpu.empty_cache()
                if attempt == 0 and on_oom is not None:
                    on_oom()  # every other tenant leaves the GPU before the retry
            if out_of_memory:
                self.oom_failures += 1
                raise ImageModelUnavailable(
                    f"The GPU ran out of memory at {params.width}x{params.height}, even after freeing the GPU for "
                    "it and retrying with VAE tiling and with model CPU offload. Try a smaller size, or close "
                    "other programs that use the GPU (check `nvidia-smi`)."
                )
            facts["fallback"] = fallback
            if fallback is not None:
                self.oom_recoveries += 1
                log.info("render recovered from out of memory fallback=%s", fallback)
            return image, facts

    def _render_once(self, pipe, params: RenderParams, on_step, cancelled, checkpoint, fallback: str | None, tail=None):
        import torch

        assert self._swap is not None
        generator = torch.Generator("cpu").manual_seed(params.seed)

        def on_step_end(p, step, timestep, kwargs):
            on_step(step + 1, params.steps)
            if cancelled():
                raise Cancelled("Render cancelled.")
            if step + 1 < params.steps and fallback != "cpu-offload":  # no pause before the decode, nor offloaded
                checkpoint(step + 1, params.steps)
                if cancelled():
                    raise Cancelled("Render cancelled.")
            if step + 1 == params.steps and fallback is None and tail is not None:
                tail(lambda: self._drop_denoisers(pipe))  # the loop is done: only the decode follows
            return {}

        restore_s = 0.0
        tiles = None
        mark: int | None = None
        baseline = 0
        t0 = time.monotonic()
        try:
            if fallback == "cpu-offload":
                self._offload(pipe)
            else:
                restore_s = self._swap.restore()
            if fallback == "vae-tiling":
                tiles = _tile_for(pipe.vae, params.width, params.height)
            # Empty the cache first: the peak would otherwise start from what an earlier render left
            # reserved, and a 512² render after a 1024² one would learn a 4x footprint.
            gpu.empty_cache()
            gpu.reset_peak()
            # What this process holds before the render (our weights, an in-process chat model):
            # only the growth above it is the render's activation peak.
            baseline = gpu.reserved_now()
            mark = gpu.activity_mark()  # anything else that uses our GPU memory meanwhile spoils the peak
            t0 = time.monotonic()
            result = pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt or None,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance,
                width=params.width,
                height=params.height,
                generator=generator,
                callback_on_step_end=on_step_end,
            )
            image = result.images[0]
            del result
        finally:
            # The stock SDXL VAE is upcast to fp32 for decoding and cast back afterwards; an error in
            # between (out of memory at decode, a cancel) would leave it fp32 and break every later render.
            vae, unet = getattr(pipe, "vae", None), getattr(pipe, "unet", None)
            if vae is not None and unet is not None and vae.dtype != unet.dtype:
                vae.to(dtype=unet.dtype)
            if fallback == "vae-tiling" and vae is not None:
                vae.disable_tiling()  # the next render tries at full quality and speed again
                if tiles is not None:
                    vae.tile_sample_min_size, vae.tile_latent_min_size = tiles
            if fallback == "cpu-offload":
                self._end_offload(pipe)
            self._end_tail()  # after the cast back: the VAE's host copy is in its resting dtype
            # Give the activations' cache back: the ledger counts an idle pipeline as its weights only,
            # and a chat planned beside it must find that memory free.
            gpu.empty_cache()
        render_s = time.monotonic() - t0
        peak = gpu.peak_reserved()
        self._learn(params, peak, baseline, fallback, mark)
        return image, {"render_s": render_s, "restore_s": restore_s, "peak_reserved_gb": peak / GiB}

    def _learn(self, params: RenderParams, peak: int, baseline: int, fallback: str | None, mark) -> None:
        """The footprint per megapixel, from this render's peak when it says something about the next one."""
        # Learn only from a clean peak: not a tiled or offloaded render (it says nothing about the normal one),
        # nor one during which anything else used this process's GPU memory (the in-process chat model, a
        # pause that evicted or restored weights): the peak is process-wide.
        # Nor from a small drawing: what a render needs whatever its size (the fixed part) divided by a few
        # thousandths of a megapixel made a 64x64 render teach 120 GB for 512x512, and every render but tiny
        # ones was refused from then on. The fixed part is the prior's; what is learned is the rest, per pixel.
        mpx = params.width * params.height / 1e6
        clean = mark is not None and gpu.activity_mark() == mark
        if peak and fallback is None and clean and self.learns and mpx >= LEARN_MIN_MPX:
            self._learned.append(max(0.0, peak - baseline - self._fixed()) / mpx)
            self._per_mpx = max(self._learned)

    def _offload(self, pipe) -> None:
        """Model CPU offload (accelerate): each part goes to the GPU only while it runs. Needs CUDA."""
        assert self._swap is not None
        self._swap.evict()  # the weights go back to their (pinned) host copy; the hooks move them from there
        if not gpu.cuda():
            # Nothing to offload from: the weights are on the CPU already. The path still runs (and says so).
            log.info("model CPU offload: no CUDA device, the pipeline already runs from host memory")
            return
        pipe.enable_model_cpu_offload()

    def _end_offload(self, pipe) -> None:
        """Remove the offload hooks and put every weight back on its host copy, wherever the hooks left it."""
        assert self._swap is not None
        if gpu.cuda():
            pipe.remove_all_hooks()
            self._swap.on_gpu = True  # a part may still sit on the GPU (an error before the pipeline's own clean-up)
            self._swap.evict()

    # -- keeping images ------------------------------------------------------------------------------
    def save(self, image: Image.Image, params: RenderParams, owner: str | None = None) -> Path:
        """Save as PNG with every parameter in its text chunks (and an A1111-style `parameters` line).

        `owner` (the user who asked for it; None without user accounts) goes into the `clair` JSON chunk,
        so each user's gallery shows their own images (`recent(owner=...)`).
        """
        private_dir(self.output_dir)
        meta = {**asdict(params), "model": self.model_id, "vae": self.vae_source}
        if owner is not None:
            meta["owner"] = owner
        info = PngInfo()
        for key, value in meta.items():
            info.add_text(key, str(value))
        info.add_text("clair", json.dumps(meta))
        negative = f"\nNegative prompt: {params.negative_prompt}" if params.negative_prompt else ""
        a1111 = (  # the line AUTOMATIC1111 writes, so its "PNG Info" tab and other tools read our images
            f"{params.prompt}{negative}\nSteps: {params.steps}, Sampler: Euler, "
            f"CFG scale: {params.guidance}, Seed: {params.seed}, Size: {params.width}x{params.height}, "
            f"Model: {self.model_id}"
        )
        info.add_text("parameters", a1111)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        slug = re.sub(r"[^a-z0-9]+", "-", params.prompt.lower()).strip("-")[:40] or "image"
        if owner is not None:
            # Every signed-in user may fetch any file in the output folder by name (Gradio's allowed_paths
            # is not per user): a random part keeps another user's images from being guessed.
            slug += "-" + secrets.token_hex(6)
        path = self.output_dir / f"{stamp}-{params.seed}-{slug}.png"
        n = 1
        while path.exists():
            path = self.output_dir / f"{stamp}-{params.seed}-{slug}-{n}.png"
            n += 1
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info)
        return write_private(path, buf.getvalue())  # 0600, atomic: never half an image in the gallery

    def recent(self, n: int, owner: str | None = None) -> list[Path]:
        """The `n` newest PNGs in the output folder (newest first), from the server's own listing.

        With `owner`, only the images whose metadata names that owner. Every path returned is a regular
        file directly inside `output_dir` (no symlinks out of it), as Gradio will serve what it names.
        """
        if not self.output_dir.is_dir():
            return []
        stamped = []
        for p in self.output_dir.glob("*.png"):
            try:
                if p.is_symlink() or not p.is_file():
                    continue
                stamped.append((p.stat().st_mtime, p))
            except OSError:
                continue  # deleted meanwhile
        stamped.sort(reverse=True)
        out: list[Path] = []
        for mtime, p in stamped:
            if len(out) >= n:
                break
            if owner is None or self._owner_of(p, mtime) == owner:
                out.append(p)
        return out

    def _owner_of(self, path: Path, mtime: float) -> str | None:
        key = (path.name, mtime)
        cache = self._owners
        if key not in cache:
            try:
                with Image.open(path) as im:  # text chunks before the image data: no decode
                    raw = im.info.get("clair")
                owner = json.loads(raw).get("owner") if isinstance(raw, str) else None
            except Exception:
                owner = None
            if len(cache) > 10000:
                cache.clear()
            cache[key] = owner if isinstance(owner, str) else None
        return cache[key]


def read_metadata(path: str | Path) -> dict:
    """Clair's metadata of a PNG (its `clair` text chunk), else every text chunk it has.

    Clair writes its chunk before the pixels, so `info` has it without decoding them (5 ms, not 60-80 ms for a
    2048² image: the file routes ask on every request); text after the pixels needs `text`, which decodes."""
    with Image.open(path) as im:
        early = im.info.get("clair")
        if isinstance(early, str):
            return json.loads(early)
        text = getattr(im, "text", {})
        return json.loads(text["clair"]) if "clair" in text else dict(text)


_KIND_WORDS = {"fp16": "the fp16-safe VAE's", "stock": "the stock VAE's (fp32 decode)"}


def _vae_folder(path: Path) -> Path | None:
    """The folder holding an AutoencoderKL: the path itself, or a diffusers pipeline's vae/."""
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _vae_config(setting: str) -> dict | None:
    """A custom VAE's config.json (local folder, or a hub id already cached), read without loading weights."""
    local = Path(setting).expanduser()
    path: str | Path | None = None
    if local.exists():
        folder = _vae_folder(local)
        path = folder / "config.json" if folder else None
    elif "/" in setting and not setting.startswith(("/", "./", "~")):
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(setting, "config.json", cache_dir=hub_cache_dir())
        except ValueError:  # not a valid repo id
            found = None
        path = found if isinstance(found, str) else None
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _tile_for(vae, width: int, height: int) -> tuple[int, int] | None:
    """Turn VAE tiling on with tiles small enough that diffusers really tiles this size; returns the tile
    sizes to put back afterwards.

    diffusers tiles a decode only when the latent is larger than `tile_latent_min_size` (`sample_size / 8`:
    128 for SDXL), so at 1024² and below tiling alone changes nothing (docs/facts.md, "VAE tiling"). Tiles of
    half the longer side (at most the default, at least 256 px) make it tile from 264 px up."""
    vae.enable_tiling()
    if not hasattr(vae, "tile_sample_min_size"):
        return None
    saved = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    scale = max(1, vae.tile_sample_min_size // max(1, vae.tile_latent_min_size))
    tile = min(saved[0], max(256, max(width, height) // 2 // 64 * 64))
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // scale
    return saved


def _short(exc: BaseException, limit: int = 300) -> str:
    """One line of an exception for the log, cut at a word (never mid-word) with an ellipsis."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text
