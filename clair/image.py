"""The image engine: an SDXL pipeline (RealVisXL by default) through diffusers, and the PNGs it keeps.

Loading goes through `StableDiffusionXLPipeline.from_pretrained` for a hub id or a local diffusers
folder (the tests save a tiny pipeline to a folder and load it through this same code); `tiny` builds
a random-weight pipeline in code for the demo. Loading is lazy (first render, under the arbiter) and
retried after a failure, so fixing the cause is enough to recover.

This module does not decide when to use the GPU: callers hold an arbiter lease around `render()`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clair import gpu
from clair.config import Config
from clair.engines import Engine
from clair.errors import BadRequest, Cancelled, ImageModelUnavailable, load_failure

log = logging.getLogger("clair.image")
GiB = 1024**3

# What a render needs on the GPU before we have measured one (shared/reference/gpu-measurements.md):
# SDXL fp16 weights are 6.46 GiB; peak *reserved* memory grows ~8.4-10.3 GiB per megapixel with the
# stock VAE (upcast to fp32 at decode): 9.2 GiB at 512², 15.5 at 1024², 26.3 at 1536².
SDXL_WEIGHTS = int(6.46 * GiB)
PRIOR_OVERHEAD = int(0.5 * GiB)
PRIOR_PER_MPX = 9.0 * GiB
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RenderParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.0
    width: int = 1024
    height: int = 1024
    seed: int = -1

    def validated(self) -> RenderParams:
        """Checked and normalised (a random seed is drawn for -1). Raises BadRequest that says what to fix."""
        if not self.prompt or not self.prompt.strip():
            raise BadRequest("Write a prompt first: describe the image you want.")
        for name, value in (("width", self.width), ("height", self.height)):
            if int(value) != value or not 64 <= value <= 2048 or int(value) % 8:
                raise BadRequest(f"{name} must be a multiple of 8 from 64 to 2048 (got {value}).")
        if not 1 <= int(self.steps) <= 150:
            raise BadRequest(f"steps must be from 1 to 150 (got {self.steps}).")
        if not 0 <= float(self.guidance) <= 30:
            raise BadRequest(f"guidance must be from 0 to 30 (got {self.guidance}).")
        seed = int(self.seed)
        if seed < -1 or seed > MAX_SEED:
            raise BadRequest(f"seed must be -1 (random) or from 0 to {MAX_SEED} (got {self.seed}).")
        if seed == -1:
            seed = random.randint(0, MAX_SEED)
        return RenderParams(
            self.prompt.strip(),
            (self.negative_prompt or "").strip(),
            int(self.steps),
            float(self.guidance),
            int(self.width),
            int(self.height),
            seed,
        )


class ImageEngine(Engine):
    name = "image"
    tenant = "image"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model_id = cfg.image_model
        self.output_dir = Path(cfg.output_dir).expanduser().resolve()
        self._lock = threading.Lock()  # guards loading; a pipeline also never runs two calls at once
        self._pipe = None
        self._swap: gpu.WeightSwap | None = None
        self._error: str | None = None
        self._error_at = 0.0
        self._per_mpx: float | None = None  # learned from real renders on CUDA

    @property
    def label(self) -> str:
        return "tiny (random weights)" if self.model_id == "tiny" else self.model_id

    def problem(self) -> str | None:
        """The last load failure, for 30 s (then the next render tries again)."""
        if self._error and time.monotonic() - self._error_at < 30:
            return self._error
        return None

    # -- memory ------------------------------------------------------------------------------------
    def footprint(self, width: int, height: int) -> tuple[int, int]:
        """(bytes while rendering at width x height, bytes while idle) on the GPU.

        Without CUDA the ledger uses SDXL's declared sizes whatever the pipeline, so the policy behaves
        (and shows) as it would on a real card.
        """
        weights = self._swap.nbytes if (self._swap is not None and gpu.cuda()) else SDXL_WEIGHTS
        mpx = width * height / 1e6
        if self._per_mpx is not None:
            return int(weights + self._per_mpx * mpx * 1.1), weights  # measured, with 10% margin
        return int(weights + PRIOR_OVERHEAD + PRIOR_PER_MPX * mpx), weights

    # -- loading -----------------------------------------------------------------------------------
    def load(self):
        if self._pipe is not None:
            return self._pipe  # loaded: don't block behind a render that holds the lock
        with self._lock:
            return self._load_locked()

    def _load_locked(self):
        if self._pipe is not None:
            return self._pipe
        t0 = time.monotonic()
        try:
            pipe = self._build()
        except ImageModelUnavailable as exc:
            self._error, self._error_at = str(exc), time.monotonic()
            raise
        except Exception as exc:
            self._error = load_failure("image model", self.model_id, exc, "CLAIR_IMAGE_MODEL")
            self._error_at = time.monotonic()
            log.exception("image model load failed model=%s", self.model_id)
            raise ImageModelUnavailable(self._error) from None
        pipe.set_progress_bar_config(disable=True)
        modules = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
        self._swap = gpu.WeightSwap([m for m in modules if m is not None], self.cfg.pinned_offload)
        self._swap.prepare()
        self._pipe, self._error = pipe, None
        log.info(
            "image model loaded model=%s s=%.2f gib=%.2f", self.model_id, time.monotonic() - t0, self._swap.nbytes / GiB
        )
        return pipe

    def _build(self):
        if self.model_id == "tiny":
            from clair.tiny import build_tiny_sdxl

            return build_tiny_sdxl()
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
        try:
            # fp16 variant files are half the download and what a GPU runs; a local folder may lack them.
            return StableDiffusionXLPipeline.from_pretrained(source, variant="fp16", **kwargs)
        except (OSError, ValueError) as exc:
            log.info("no fp16 variant (%s); loading the default weights", _short(exc))
            return StableDiffusionXLPipeline.from_pretrained(source, **kwargs)

    # -- swaps (called by the arbiter) ---------------------------------------------------------------
    def evict(self) -> None:
        if self._swap is not None:
            dt = self._swap.evict()
            log.debug("image pipeline evicted s=%.3f", dt)

    # -- rendering -----------------------------------------------------------------------------------
    def render(
        self,
        params: RenderParams,
        on_step: Callable[[int, int], None] = lambda step, total: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> tuple[Image.Image, dict]:
        """Render on the GPU the caller's lease holds. Returns the image and timings/memory facts."""
        import torch

        with self._lock:
            pipe = self._load_locked()
            assert self._swap is not None
            generator = torch.Generator("cpu").manual_seed(params.seed)

            def on_step_end(p, step, timestep, kwargs):
                on_step(step + 1, params.steps)
                if cancelled():
                    raise Cancelled("Render cancelled.")
                return {}

            try:
                restore_s = self._swap.restore()
                # Empty the cache first: the peak would otherwise start from what an earlier render left
                # reserved, and a 512² render after a 1024² one would learn a 4x footprint.
                gpu.empty_cache()
                gpu.reset_peak()
                # What this process holds before the render (our weights, an in-process chat model):
                # only the growth above it is the render's activation peak.
                baseline = gpu.reserved_now()
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
            except torch.OutOfMemoryError:
                raise ImageModelUnavailable(
                    f"The GPU ran out of memory at {params.width}x{params.height}. Try a smaller size, or lower "
                    "CLAIR_VRAM_BUDGET_GB so Clair evicts more before rendering."
                ) from None
            finally:
                # The stock SDXL VAE is upcast to fp32 for decoding and cast back afterwards; an error in
                # between (out of memory at decode, a cancel) would leave it fp32 and break every later render.
                vae, unet = getattr(pipe, "vae", None), getattr(pipe, "unet", None)
                if vae is not None and unet is not None and vae.dtype != unet.dtype:
                    vae.to(dtype=unet.dtype)
                # Give the activations' cache back: the ledger counts an idle pipeline as its weights only,
                # and a chat planned beside it must find that memory free.
                gpu.empty_cache()
            render_s = time.monotonic() - t0
            peak = gpu.peak_reserved()
            if peak and self._swap is not None:
                mpx = params.width * params.height / 1e6
                per = max(0.0, peak - baseline) / mpx
                self._per_mpx = per if self._per_mpx is None else max(per, self._per_mpx)
            return result.images[0], {"render_s": render_s, "restore_s": restore_s, "peak_reserved_gb": peak / GiB}

    # -- keeping images ------------------------------------------------------------------------------
    def save(self, image: Image.Image, params: RenderParams) -> Path:
        """Save as PNG with every parameter in its text chunks (and an A1111-style `parameters` line)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        meta = {**asdict(params), "model": self.model_id}
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
        path = self.output_dir / f"{stamp}-{params.seed}-{slug}.png"
        n = 1
        while path.exists():
            path = self.output_dir / f"{stamp}-{params.seed}-{slug}-{n}.png"
            n += 1
        tmp = path.with_suffix(".png.part")
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)  # never leave half an image in the gallery
        return path

    def recent(self, n: int) -> list[Path]:
        if not self.output_dir.is_dir():
            return []
        files = sorted(self.output_dir.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
        return files[:n]


def read_metadata(path: str | Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["clair"]) if "clair" in getattr(im, "text", {}) else dict(im.text)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
