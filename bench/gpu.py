"""How fast Clair's arbiter can swap models on a real GPU, measured against the physical limit.

What it measures (each timing repeated, reported as median and min, with ``torch.cuda.synchronize()``
on both sides):

1. Host<->device bandwidth with a 1 GiB buffer: pinned host->device and device->host, pageable both
   ways. The **PCIe bound** of a model is its bytes / the pinned host->device bandwidth of this run.
2. SDXL's weights (UNet, VAE, both CLIP text encoders; 6.94 GB fp16) through ``clair.device.gpu.WeightSwap``
   with a pinned host copy (``pinned_mode="on"``): ``prepare()`` (making the pinned copy, once at load),
   ``evict()`` (time and GPU memory freed), ``restore()`` (time, GB/s, ratio to the PCIe bound), and
   that the weights are bitwise identical after the round trips.
3. The same without the pinned copy (``pinned_mode="off"``: ``.to("cpu")`` / ``.to("cuda")``).
4. An LLM with Llama-3-8B shapes (bf16, 16.06 GB at 32 layers), pinned vs pageable, as in 2 and 3.
5. With diffusers: a 1024x1024 render-shaped workload (30 UNet steps at batch 2 for CFG on random text
   embeddings, then a VAE decode upcast to fp32 like the stock SDXL VAE): seconds and peak memory.
6. The environment: GPU, memory, torch/CUDA, driver and PCIe link (nvidia-smi).
7. The 1024x1024 peak (allocated and reserved) with the stock VAE (fp32 decode) and with an fp16-safe one
   (fp16 decode), each with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False`` and ``:True``, each in a
   fresh child process (an allocator setting only takes effect before CUDA is first used), against
   Clair's prior for that VAE. ``--only-vae`` runs just this and the environment (about a minute).

Why: the arbiter hands the one GPU between chat and images by evicting one tenant and restoring the
other. Its goals are an SDXL restore within 1.25x of the PCIe bound and an SDXL eviction under 50 ms;
this script checks them on real hardware (docs/facts.md has earlier numbers, with their machines).

Models are built from config dicts written below, with random weights: nothing is downloaded. With
diffusers importable, SDXL is the real ``UNet2DConditionModel``/``AutoencoderKL`` plus transformers' CLIP
text encoders; without it, a stand-in of plain tensors with SDXL's per-component byte and tensor counts
(no render then). The JSON says which (``sdxl.source``).

Run on a CUDA machine (about 2 minutes on an H100 as estimated from the reference numbers, not yet
timed; about 1 with --quick; the pageable ``.to("cpu")`` evictions take most of it)::

    python bench/gpu.py --out bench/out/gpu.json

The lent H100/H200 machines have torch, transformers and accelerate but no diffusers and no network.
For the real UNet, fetch the wheel here first and carry it (bench/out/ is git-ignored)::

    .venv/bin/pip download diffusers==0.42.1 --no-deps -d bench/out/wheels
    # then on the device, with carry=["bench/out/wheels"]:
    python3 -m pip install -q --no-deps bench/out/wheels/diffusers-0.42.1-py3-none-any.whl && \
        python3 bench/gpu.py --out $OUT/gpu.json

Without CUDA it exits with code 2, unless ``--dry-run``: then every code path runs with tiny sizes on
whatever device there is, in seconds, and the numbers are marked "dry-run: not meaningful". On the CPU
that means no pinned memory and no-op swaps; on a GPU it runs the real CUDA paths at tiny sizes, a cheap
smoke test to chain before the full run (``--dry-run --quick --out $OUT/dry.json && ...``). Exit code 1
means a section failed (its error is in the JSON, which is rewritten after every section).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Measure under the allocator Clair runs with (expandable segments, clair/device/allocator.py), unless the caller
# chose one: it must be in the environment before torch first touches CUDA.
from clair.device import allocator  # noqa: E402 (imports no torch)

ALLOC_VAR, ALLOC_CONF = allocator.apply()

import psutil  # noqa: E402
import torch  # noqa: E402

from clair.device.gpu import WeightSwap, module_bytes  # noqa: E402 (needs the repo root on sys.path first)

GB = 1e9  # bandwidths and model sizes in decimal GB, as in gpu-measurements.md
GiB = 1024**3  # memory footprints in GiB, as torch and nvidia-smi report them
NOT_MEANINGFUL = "dry-run: not meaningful"
GOAL_RESTORE_RATIO = 1.25
GOAL_EVICT_S = 0.050

# -- Model shapes ---------------------------------------------------------------------------------------
# SDXL base 1.0's component configs (stabilityai/stable-diffusion-xl-base-1.0, also RealVisXL's).
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # diffusers' name for the head *count* per block
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (OpenCLIP bigG), concatenated
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 x 256 time ids + 1280 pooled text
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_CLIP_COMMON = {"vocab_size": 49408, "max_position_embeddings": 77}
SDXL_TEXT_ENCODER = {  # CLIP ViT-L/14
    **_CLIP_COMMON,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14, with its text projection
    **_CLIP_COMMON,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}

# --dry-run: the same block layout with a few channels, so CPU runs every path in seconds.
_DRY_TEXT = {
    **{"vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 999},
    **{"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2},
}
DRY_OVERRIDES = {
    "unet": {
        "block_out_channels": [32, 32, 64],
        "attention_head_dim": [1, 1, 2],
        "transformer_layers_per_block": [1, 1, 1],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
        "sample_size": 8,
    },
    "vae": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4},
    "text_encoder": {**_DRY_TEXT, "num_attention_heads": 4, "projection_dim": 32},
    "text_encoder_2": {**_DRY_TEXT, "num_attention_heads": 4, "projection_dim": 32},
    "llm": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
}
DRY_SCALE = 1 / 1000  # stand-in byte counts in --dry-run


@dataclass(frozen=True)
class Footprint:
    """What a stand-in copies: one component's bytes and tensor count (``small`` of them biases/norms)."""

    nbytes: int
    tensors: int
    small: int


# Counted from the real modules built on the meta device (fp16): small = at most 4096 elements.
SDXL_FOOTPRINTS = {
    "unet": Footprint(5_134_927_368, 1680, 816),
    "text_encoder": Footprint(246_121_114, 197, 123),
    "text_encoder_2": Footprint(1_389_319_834, 518, 291),
    "vae": Footprint(167_307_726, 248, 180),
}
LLAMA_FIXED_BYTES = 2_101_354_752  # embeddings + lm_head + final norm + rotary buffers, bf16
LLAMA_LAYER_BYTES = 436_224_000  # q, k, v, o, gate, up, down + 2 norms


def llama_footprint(layers: int) -> Footprint:
    return Footprint(LLAMA_FIXED_BYTES + layers * LLAMA_LAYER_BYTES, 5 + 9 * layers, 3 + 2 * layers)


# -- Small helpers ----------------------------------------------------------------------------------------


class Bench:
    """The run's device, repeat counts and results; writes the JSON after every section."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        quick = args.quick or args.dry_run
        self.reps_bw = 3 if quick else 5
        self.reps_pinned = 3 if quick else 5
        self.reps_pageable = 2 if quick else 3
        self.reps_render = 1 if quick else 2
        self.t0 = time.perf_counter()
        self.failed: list[str] = []
        self.results: dict[str, Any] = {
            "schema": 1,
            "dry_run": self.dry,
            "note": NOT_MEANINGFUL if self.dry else "",
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "args": vars(args),
        }

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reserved(self) -> int:
        return torch.cuda.memory_reserved() if self.cuda else 0

    def free_memory(self) -> None:
        """Give back what the last section held: GPU cache and the pinned host blocks torch caches."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            # The caching host allocator keeps freed pinned blocks; its name moved between torch releases.
            empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
                torch._C, "_host_emptyCache", None
            )
            if empty_host is not None:
                empty_host()

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one section; a failure is recorded and printed, and the next section still runs."""
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            traceback.print_exc()
            out = {"error": f"{type(exc).__name__}: {exc}"}
            self.failed.append(name)
            print(f"   FAILED: {out['error']}", flush=True)
        if "skipped" in out:
            print(f"   skipped: {out['skipped']}")
        out["elapsed_s"] = round(time.perf_counter() - t0, 3)
        if self.dry:
            out["note"] = NOT_MEANINGFUL
        self.results[name] = out
        self.free_memory()
        self.write()
        return out

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        tmp.replace(out)


def put_runs(d: dict[str, Any], key: str, runs: list[float]) -> None:
    """d[key] = median, d[key_min] = min, d[key_runs] = every run (seconds)."""
    d[key] = statistics.median(runs) if runs else None
    d[f"{key}_min"] = min(runs) if runs else None
    d[f"{key}_runs"] = [round(r, 6) for r in runs]


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def row(label: str, median: float | None, low: float | None, gbs: float | None = None, x: float | None = None) -> None:
    print(f"   {label:<26}{fmt_s(median):>11}{fmt_s(low):>11}{fmt(gbs, '.1f', ' GB/s'):>12}{fmt(x, '.2f', 'x'):>9}")


def header() -> None:
    print(f"   {'':<26}{'median':>11}{'min':>11}{'rate':>12}{'x bound':>9}")


def nvidia_smi(fields: str) -> list[str] | None:
    try:
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return [v.strip() for v in proc.stdout.splitlines()[0].split(",")]


def pcie_link() -> dict[str, str] | None:
    values = nvidia_smi("pcie.link.gen.current,pcie.link.width.current")
    return None if values is None else dict(zip(("gen_current", "width_current"), values, strict=False))


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes: NaN equals NaN here (torch.equal calls NaN unequal to itself, so a
    pause that changed nothing would read as a difference whenever a random-weight run makes a NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().cpu(), b.detach().contiguous().cpu()
    return a.view(torch.uint8).equal(b.view(torch.uint8)) if a.numel() else True


def weights_digest(
    modules: list[torch.nn.Module], sample: int = 8, cap: int = 16 * 2**20, head: int = 64 * 2**10
) -> str:
    """sha256 over every tensor's dtype, shape and first `head` bytes, and `cap` bytes of a few (evenly spaced,
    plus the largest).

    Every tensor counts (a sample of 9 could not see two tensors swapped, or one left in another dtype, by a
    wrong id mapping in WeightSwap); the heads cost ~0.1 s of small copies for SDXL's 2643 tensors.
    """
    tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    picks = {round(i * (len(tensors) - 1) / max(1, sample - 1)) for i in range(sample)}
    picks.add(max(range(len(tensors)), key=lambda i: tensors[i].numel()))
    h = hashlib.sha256()
    for i, t in enumerate(tensors):
        raw = t.detach().reshape(-1).view(torch.uint8)[: cap if i in picks else head]
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(raw.cpu().numpy().tobytes())
    return h.hexdigest()


def tensor_count(modules: list[torch.nn.Module]) -> int:
    return sum(1 for m in modules for _ in [*m.parameters(), *m.buffers()])


# -- Sections ----------------------------------------------------------------------------------------------


def environment(b: Bench) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(b.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host_ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "host_ram_available_gib": round(psutil.virtual_memory().available / GiB, 1),
        "cpus": os.cpu_count(),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "allocator": f"{ALLOC_VAR}={ALLOC_CONF}",  # what the swaps were measured under
    }
    for pkg in ("diffusers", "transformers", "accelerate"):
        try:  # installed versions, read without importing: sdxl/llm say whether the import worked
            env[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            env[pkg] = None
    if b.cuda:
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / GiB, 2),
            "sms": props.multi_processor_count,
        }
    smi = nvidia_smi("driver_version,pcie.link.gen.max,pcie.link.width.max")
    if smi:
        env |= dict(zip(("driver", "pcie_gen_max", "pcie_width_max"), smi, strict=False))
    # The link trains down when idle, so this reading can be below what transfers get: see bandwidth.pcie_link.
    env["pcie_link_at_start"] = pcie_link()
    for k in ("gpu", "gpu_memory_gib", "torch", "torch_cuda", "driver", "pcie_link_at_start", "diffusers"):
        print(f"   {k:<26}{env.get(k)}")
    return env


def bandwidth(b: Bench) -> dict[str, Any]:
    nbytes = 2**30 if not b.dry else 8 * 2**20
    pin = b.cuda  # pin_memory needs CUDA; in a CPU dry-run the "pinned" cases copy pageable memory
    host_pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(1)
    host_pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(2)  # touched: no page faults in the timing
    dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=b.device).fill_(3)
    cases: dict[str, Callable[[], object]] = {
        "h2d_pinned": lambda: dev_buf.copy_(host_pinned, non_blocking=True),
        "d2h_pinned": lambda: host_pinned.copy_(dev_buf, non_blocking=True),
        "h2d_pageable": lambda: dev_buf.copy_(host_pageable),
        "d2h_pageable": lambda: host_pageable.copy_(dev_buf),
    }
    out: dict[str, Any] = {"buffer_bytes": nbytes, "pinned": pin, "repeats": b.reps_bw}
    print(f"   buffer {nbytes / GB:.2f} GB, {b.reps_bw} runs each, pinned={pin}")
    header()
    for name, copy in cases.items():
        b.timed(copy)  # warm-up: first-touch mappings, lazy CUDA init
        runs = [b.timed(copy) for _ in range(b.reps_bw)]
        put_runs(out, f"{name}_s", runs)
        out[f"{name}_gbs"] = nbytes / GB / out[f"{name}_s"]
        out[f"{name}_gbs_max"] = nbytes / GB / out[f"{name}_s_min"]
        row(name, out[f"{name}_s"], out[f"{name}_s_min"], out[f"{name}_gbs"])
        if name == "h2d_pinned":
            out["pcie_link"] = pcie_link()  # read right after traffic, before the link idles down
    print(f"   pcie link under load: {out['pcie_link']}")
    return out


def pcie_bound_s(b: Bench, nbytes: int) -> float | None:
    """Seconds the bytes need at this run's median pinned host->device bandwidth: the floor for a restore."""
    gbs = b.results.get("bandwidth", {}).get("h2d_pinned_gbs")
    return nbytes / GB / gbs if gbs else None


def swap_round_trips(b: Bench, modules: list[torch.nn.Module]) -> dict[str, Any]:
    """Pageable then pinned evict/restore of modules that start on the device; they end there too.

    Pageable first, because its last eviction leaves the weights in pageable host memory, which is where
    `from_pretrained` leaves them and so where Clair's `prepare()` starts from.
    """
    nbytes = module_bytes(modules)
    before = weights_digest(modules)
    bound = pcie_bound_s(b, nbytes)
    out: dict[str, Any] = {"bytes": nbytes, "gb": nbytes / GB, "tensors": tensor_count(modules), "pcie_bound_s": bound}
    available = psutil.virtual_memory().available
    if available < 2 * nbytes + 2 * GiB:  # a pageable copy and the pinned one coexist during prepare()
        out["skipped"] = f"host RAM: {available / GiB:.1f} GiB available, {(2 * nbytes) / GiB + 2:.1f} needed"
        print(f"   skipped: {out['skipped']}")
        return out

    print(f"   {nbytes / GB:.2f} GB in {out['tensors']} tensors; PCIe bound {fmt_s(bound)}")
    header()

    # 1. Pageable: .to("cpu") allocates fresh host memory each time, .to("cuda") copies from it.
    pageable: dict[str, Any] = {"mode": "off"}
    swap = WeightSwap(modules, pinned_mode="off")
    swap.on_gpu = b.cuda  # built on the device; WeightSwap assumes host-resident weights until told
    evicts, restores = [], []
    for _ in range(b.reps_pageable):
        evicts.append(b.timed(swap.evict))
        restores.append(b.timed(swap.restore))
    pageable["identical_after_swaps"] = weights_digest(modules) == before
    evicts.append(b.timed(swap.evict))  # leaves the weights in pageable host memory (see docstring)
    put_runs(pageable, "evict_s", evicts)
    put_runs(pageable, "restore_s", restores)
    pageable["restore_gbs"] = ratio(nbytes / GB, pageable["restore_s"])
    pageable["restore_ratio_to_pcie_bound"] = ratio(pageable["restore_s"], bound)
    out["pageable"] = pageable

    # 2. Pinned: one pinned copy made at load; evict re-points tensors at it, restore is one PCIe pass.
    pinned: dict[str, Any] = {"mode": "on"}
    swap = WeightSwap(modules, pinned_mode="on")
    pinned["pinned_active"] = swap.pinned  # False without CUDA: WeightSwap is a no-op there
    pinned["prepare_s"] = b.timed(swap.prepare)
    if b.cuda:  # the pinned copy's real cost in host RAM: the caching host allocator rounds blocks up
        stats = getattr(torch.cuda, "host_memory_stats", dict)()
        pinned["host_pinned_active_bytes"] = stats.get("active_bytes.current")
        pinned["host_pinned_allocated_bytes"] = stats.get("allocated_bytes.current")
    evicts, restores, freed, left = [], [], [], []
    restores.append(b.timed(swap.restore))
    for _ in range(b.reps_pinned):
        held = b.allocated()
        evicts.append(b.timed(swap.evict))
        freed.append(held - b.allocated())
        left.append(b.reserved())
        restores.append(b.timed(swap.restore))
    pinned["identical_after_swaps"] = weights_digest(modules) == before
    put_runs(pinned, "evict_s", evicts)
    put_runs(pinned, "restore_s", restores)
    pinned["evict_freed_bytes"] = min(freed) if freed else None
    pinned["evict_freed_fraction"] = ratio(pinned["evict_freed_bytes"], nbytes) if b.cuda else None
    pinned["reserved_after_evict_bytes"] = max(left) if left else None
    pinned["restore_gbs"] = ratio(nbytes / GB, pinned["restore_s"])
    pinned["restore_ratio_to_pcie_bound"] = ratio(pinned["restore_s"], bound)
    out["pinned"] = pinned

    row("pinned prepare (once)", pinned["prepare_s"], None)
    row("pinned evict", pinned["evict_s"], pinned["evict_s_min"])
    row(
        "pinned restore",
        pinned["restore_s"],
        pinned["restore_s_min"],
        pinned["restore_gbs"],
        pinned["restore_ratio_to_pcie_bound"],
    )
    row("pageable evict (.to cpu)", pageable["evict_s"], pageable["evict_s_min"])
    row(
        "pageable restore (.to dev)",
        pageable["restore_s"],
        pageable["restore_s_min"],
        pageable["restore_gbs"],
        pageable["restore_ratio_to_pcie_bound"],
    )
    freed_gib = fmt(ratio(pinned["evict_freed_bytes"], GiB), ".2f", " GiB")
    print(f"   pinned evict freed {freed_gib} ({fmt(pinned['evict_freed_fraction'], '.0%')} of the weights)")
    print(
        f"   bitwise identical after swaps: pinned {pinned['identical_after_swaps']}, pageable {pageable['identical_after_swaps']}"
    )
    return out


class StandIn(torch.nn.Module):
    """Plain tensors with a component's byte and tensor count (no forward): what a swap moves, nothing more.

    Half-ish of a real model's tensors are tiny (biases, norms); the rest share the bytes evenly.
    """

    def __init__(self, fp: Footprint, dtype: torch.dtype, device: torch.device, scale: float = 1.0):
        super().__init__()
        numel = max(1, int(fp.nbytes * scale) // dtype.itemsize)
        small = max(1, numel // 1000 // max(1, fp.small))  # the small tensors hold ~0.1% of the bytes
        big = max(1, (numel - small * fp.small) // max(1, fp.tensors - fp.small))
        sizes = [small] * fp.small + [big] * (fp.tensors - fp.small)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(n, dtype=dtype, device=device), requires_grad=False) for n in sizes
        )


def build_sdxl(b: Bench) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """SDXL's four components on the device: real diffusers/transformers modules, else stand-ins."""
    dtype = torch.float16 if b.cuda else torch.float32  # fp16 convolutions crawl on the CPU (dry-run)
    info: dict[str, Any] = {"dtype": str(dtype)}
    reason = None
    if b.args.standin:
        reason = "--standin"
    else:
        try:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from diffusers.utils import logging as diffusers_logging
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            # Its warning on every .to(dtype) is about from_pretrained's keep-in-fp32 list, empty for SDXL.
            diffusers_logging.set_verbosity_error()
        except Exception as exc:  # diffusers is not on the lent machines unless its wheel is carried
            reason = f"diffusers not importable ({type(exc).__name__}: {exc})"
    if reason is not None:
        info |= {"source": "standin", "standin_reason": reason}
        info["full_size_bytes"] = sum(fp.nbytes for fp in SDXL_FOOTPRINTS.values())
        scale = DRY_SCALE if b.dry else 1.0
        comps = {name: StandIn(fp, dtype, b.device, scale) for name, fp in SDXL_FOOTPRINTS.items()}
        return comps, info

    def make(overrides: dict[str, dict[str, Any]], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
        """Each component is initialised in fp32, then cast before the next is built (peak: UNet fp32 + fp16)."""

        def cfg(name: str, base: dict[str, Any]) -> dict[str, Any]:
            return {**base, **overrides.get(name, {})}

        builders: dict[str, Callable[[], torch.nn.Module]] = {
            "unet": lambda: UNet2DConditionModel.from_config(cfg("unet", SDXL_UNET)),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg("text_encoder", SDXL_TEXT_ENCODER))),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(
                CLIPTextConfig(**cfg("text_encoder_2", SDXL_TEXT_ENCODER_2))
            ),
            "vae": lambda: AutoencoderKL.from_config(cfg("vae", SDXL_VAE)),
        }
        return {name: build().to(dtype).eval().requires_grad_(False) for name, build in builders.items()}

    info["source"] = "diffusers"
    with torch.device("meta"):  # full size, no memory: checks the config dicts above add up to SDXL
        info["full_size_bytes"] = module_bytes(make({}, torch.float16).values())
    with torch.device(b.device):  # random init straight on the device: seconds, not a minute on the CPU
        comps = make(DRY_OVERRIDES if b.dry else {}, dtype)
    return comps, info


def sdxl(b: Bench) -> dict[str, Any]:
    t0 = time.perf_counter()
    comps, info = build_sdxl(b)
    b.sync()
    info["build_s"] = time.perf_counter() - t0
    info["components"] = {name: {"bytes": module_bytes([m]), "tensors": tensor_count([m])} for name, m in comps.items()}
    why = f" ({info['standin_reason']})" if "standin_reason" in info else ""
    print(f"   source: {info['source']}{why}; built in {info['build_s']:.1f} s")
    info |= swap_round_trips(b, list(comps.values()))
    b.results["sdxl"] = info  # render() runs while the weights are still resident
    b.section("render_1024", lambda: render(b, comps, info))
    return info


def render(b: Bench, comps: dict[str, torch.nn.Module], sdxl_info: dict[str, Any]) -> dict[str, Any]:
    """30 UNet steps at 1024x1024 (batch 2: CFG) on random text embeddings, then a 1x4x128x128 VAE decode.

    The Euler update is replaced by a plain step: the time is all in the UNet and the VAE. The VAE is
    upcast to fp32 for the decode (unless --vae-fp16), as the stock SDXL pipeline does: that decode sets
    the peak (docs/facts.md).
    """
    if b.args.skip_render:
        return {"skipped": "--skip-render"}
    if sdxl_info.get("source") != "diffusers":
        return {"skipped": f"no real UNet: {sdxl_info.get('standin_reason')}"}
    unet, vae = comps["unet"], comps["vae"]
    if next(unet.parameters()).device.type != b.device.type:
        return {"skipped": "the SDXL weights are not on the device (swaps skipped)"}
    size = 64 if b.dry else 1024
    steps = b.args.render_steps or (2 if b.dry else 30)
    upcast = not b.args.vae_fp16
    dtype = next(unet.parameters()).dtype
    lat = size // 8
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    gen = torch.Generator(b.device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=b.device, dtype=dtype)

    cond = {
        "encoder_hidden_states": randn(2, 77, unet.config.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": randn(2, pooled),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=b.device, dtype=dtype),
        },
    }
    phases: dict[str, list[float]] = {"unet_s": [], "vae_decode_s": []}

    @torch.no_grad()  # as the pipeline's __call__ (inference_mode would make the upcast VAE's weights inference tensors)
    def one_render(n_steps: int) -> None:
        t0 = time.perf_counter()
        latents = randn(1, 4, lat, lat)
        for t in torch.linspace(999, 0, n_steps).round().long().tolist():
            noise = unet(torch.cat([latents] * 2), t, **cond).sample
            uncond, text = noise.chunk(2)
            latents = latents - (uncond + 7.0 * (text - uncond)) / n_steps
        b.sync()
        t1 = time.perf_counter()
        if upcast:
            vae.to(torch.float32)
        vae.decode((latents / vae.config.scaling_factor).to(vae.dtype))
        if upcast:
            vae.to(dtype)
        b.sync()
        phases["unet_s"].append(t1 - t0)
        phases["vae_decode_s"].append(time.perf_counter() - t1)

    b.timed(lambda: one_render(2))  # warm-up: cuDNN/cuBLAS choose their kernels on the first call
    for v in phases.values():
        v.clear()
    b.free_memory()
    weights_alloc, weights_reserved = b.allocated(), b.reserved()
    if b.cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [b.timed(lambda: one_render(steps)) for _ in range(b.reps_render)]
    out: dict[str, Any] = {"width": size, "height": size, "steps": steps, "batch": 2, "vae_upcast_fp32": upcast}
    put_runs(out, "render_s", runs)
    put_runs(out, "unet_s", phases["unet_s"])
    put_runs(out, "vae_decode_s", phases["vae_decode_s"])
    out["s_per_step"] = out["unet_s"] / steps
    peak_alloc = torch.cuda.max_memory_allocated() if b.cuda else 0
    peak_reserved = torch.cuda.max_memory_reserved() if b.cuda else 0
    mpx = size * size / 1e6
    out |= {
        "weights_allocated_gib": weights_alloc / GiB,
        "weights_reserved_gib": weights_reserved / GiB,
        "peak_allocated_gib": peak_alloc / GiB,
        "peak_reserved_gib": peak_reserved / GiB,
        "reserved_over_weights_per_mpx_gib": (peak_reserved - weights_alloc) / GiB / mpx,
    }
    try:  # what the arbiter assumes before it has measured a render, to compare with peak_reserved_gib
        from clair.engines.image import PRIORS, SDXL_WEIGHTS

        out["clair_prior_gib"] = PRIORS["stock" if upcast else "fp16"].need(SDXL_WEIGHTS, mpx) / GiB
    except Exception as exc:  # clair.engines.image needs Pillow; the prior is a comparison, not a measurement
        out["clair_prior_gib"] = None
        out["clair_prior_error"] = f"{type(exc).__name__}: {exc}"
    out["pause_resume"] = pause_resume(b, unet, randn, cond, steps, lat)
    header()
    row(f"render {size}px, {steps} steps", out["render_s"], out["render_s_min"])
    row("  of which UNet", out["unet_s"], out["unet_s_min"])
    row("  of which VAE decode", out["vae_decode_s"], out["vae_decode_s_min"])
    print(
        f"   peak allocated {out['peak_allocated_gib']:.2f} GiB, reserved {out['peak_reserved_gib']:.2f} GiB "
        f"(weights {out['weights_allocated_gib']:.2f}); Clair's prior {fmt(out['clair_prior_gib'], '.2f', ' GiB')}"
    )
    return out


def pause_resume(b: Bench, unet: torch.nn.Module, randn, cond: dict, steps: int, lat: int) -> dict[str, Any]:
    """One pause and resume of the denoising loop at half-way, as Clair preempts a render for a chat
    (docs/design.md, "Preemption at step boundaries"): the UNet's weights leave the device through Clair's
    own WeightSwap (a pointer swap to the pinned host copy) and the cache is emptied, then they come back and
    the loop carries on. Reports the time to yield and to resume, and whether the final latents are
    bit-identical to the same loop without a pause (the image is their decode)."""
    from clair.device.gpu import WeightSwap

    def loop(pause_at: int | None, swap: WeightSwap | None) -> tuple[torch.Tensor, float, float]:
        gen_state = torch.Generator(b.device).manual_seed(1)
        latents = torch.randn(1, 4, lat, lat, generator=gen_state, device=b.device, dtype=next(unet.parameters()).dtype)
        yield_s = resume_s = 0.0
        with torch.no_grad():
            for i, t in enumerate(torch.linspace(999, 0, steps).round().long().tolist()):
                if i == pause_at and swap is not None:
                    b.sync()
                    t0 = time.perf_counter()
                    swap.evict()
                    b.free_memory()
                    b.sync()
                    yield_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    swap.restore()
                    b.sync()
                    resume_s = time.perf_counter() - t0
                noise = unet(torch.cat([latents] * 2), t, **cond).sample
                uncond, text = noise.chunk(2)
                latents = latents - (uncond + 7.0 * (text - uncond)) / steps
        b.sync()
        return latents, yield_s, resume_s

    swap = WeightSwap([unet], pinned_mode="on" if b.cuda else "off", device=b.device if b.cuda else "cpu")
    swap.on_gpu = True  # the UNet is on the device now (on CPU: the "device copy" is a second host tensor)
    swap.prepare()
    alone, _, _ = loop(None, None)
    paused, yield_s, resume_s = loop(max(1, steps // 2), swap)
    out = {
        "paused_at_step": max(1, steps // 2),
        "yield_s": yield_s,
        "resume_s": resume_s,
        "latents_identical": bit_identical(alone, paused),
        "pinned": swap.pinned,
    }
    print(
        f"   pause at step {out['paused_at_step']}: yield {fmt_s(yield_s)}, resume {fmt_s(resume_s)}, "
        f"latents identical: {out['latents_identical']}"
    )
    return out


# The 1024² peak per VAE and allocator setting. A CUDA allocator setting is read once, when the process first
# uses CUDA: each combination runs in a fresh child process (this script with --vae-child).
VAE_KINDS = {"stock": False, "fp16": True}  # kind -> decode in fp16 (no upcast, as the fp16-safe VAE)
ALLOC_CONFS = {"default": "expandable_segments:False", "expandable": "expandable_segments:True"}


def vae_peaks(b: Bench) -> dict[str, Any]:
    """A 1024² render's peak allocated and reserved memory with the stock VAE (fp32 decode) and the fp16-safe
    one (fp16 decode: same architecture, so the same memory as madebyollin/sdxl-vae-fp16-fix), each with
    and without expandable segments. The figures behind Clair's priors (docs/facts.md) and its allocator
    setting (clair/device/allocator.py)."""
    if b.args.skip_render:
        return {"skipped": "--skip-render"}
    steps = b.args.render_steps or 4  # the peak is the decode's: 4 steps show it as well as 30
    out: dict[str, Any] = {"steps": steps, "runs": {}}
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    print(f"   {'VAE / allocator':<26}{'alloc GiB':>11}{'reserved':>11}{'frag.':>9}{'prior':>9}{'render':>9}")
    for kind, fp16 in VAE_KINDS.items():
        for alloc, conf in ALLOC_CONFS.items():
            name = f"{kind}/{alloc}"
            child_out = Path(b.args.out).with_name(f"{Path(b.args.out).stem}.vae-{kind}-{alloc}.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--vae-child", "--out", str(child_out)]
            cmd += ["--render-steps", str(steps), *(["--vae-fp16"] if fp16 else [])]
            cmd += [flag for flag, on in (("--dry-run", b.dry), ("--standin", b.args.standin)) if on]
            proc = subprocess.run(
                cmd, env={**base_env, "PYTORCH_CUDA_ALLOC_CONF": conf}, capture_output=True, text=True, timeout=900
            )
            try:
                r = json.loads(child_out.read_text())["render_1024"]
            except (OSError, ValueError, KeyError):
                r = {"error": f"child exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
            if "error" in r or "skipped" in r:
                out["runs"][name] = {"alloc_conf": conf, **r}
                print(f"   {name:<26}{r.get('error') or r.get('skipped')}")
                continue
            run = {
                "alloc_conf": conf,
                "vae_upcast_fp32": r["vae_upcast_fp32"],
                "width": r["width"],
                "height": r["height"],
                "weights_allocated_gib": r["weights_allocated_gib"],
                "peak_allocated_gib": r["peak_allocated_gib"],
                "peak_reserved_gib": r["peak_reserved_gib"],
                "fragmentation_gib": r["peak_reserved_gib"] - r["peak_allocated_gib"],
                "clair_prior_gib": r.get("clair_prior_gib"),
                "render_s": r["render_s"],
            }
            out["runs"][name] = run
            print(
                f"   {name:<26}{run['peak_allocated_gib']:>11.2f}{run['peak_reserved_gib']:>11.2f}"
                f"{run['fragmentation_gib']:>9.2f}{fmt(run['clair_prior_gib'], '.2f'):>9}{fmt_s(run['render_s']):>9}"
            )
    bad = [n for n, r in out["runs"].items() if "error" in r]
    if bad:
        raise RuntimeError(f"VAE peak runs failed: {', '.join(bad)}; see the JSON's runs")
    return out


def vae_child(b: Bench) -> int:
    """--vae-child: build SDXL, render once at 1024² (after a warm-up), record the peaks; nothing else."""

    def run() -> dict[str, Any]:
        comps, info = build_sdxl(b)
        out = render(b, comps, info)
        out["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        return out

    b.section("render_1024", run)
    return 1 if b.failed else 0


def llm(b: Bench) -> dict[str, Any]:
    """Llama-3-8B shapes in bf16: built on the meta device, materialized on the device, random weights.

    Nothing runs the model: only its bytes move, so every tensor (buffers too) is filled with noise.
    """
    dtype = torch.bfloat16
    layers = b.args.llm_layers or (8 if b.args.quick else 32)
    info: dict[str, Any] = {"dtype": str(dtype), "requested_layers": layers}
    reason = "--standin" if b.args.standin else None
    if reason is None:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except Exception as exc:
            reason = f"transformers not importable ({type(exc).__name__}: {exc})"

    def full_size(n: int) -> int:
        if reason is not None:
            return llama_footprint(n).nbytes
        with torch.device("meta"):
            return module_bytes([LlamaForCausalLM(LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": n})).to(dtype)])

    if b.cuda and not b.dry:  # fewer layers if the card cannot hold them (a consumer card, say)
        free, _ = torch.cuda.mem_get_info()
        per_layer = full_size(2) - full_size(1)
        fits = int((free - 2 * GiB - (full_size(1) - per_layer)) // per_layer)
        if fits < layers:
            info["reduced_reason"] = f"{free / GiB:.1f} GiB free on the device: {max(1, fits)} layers fit"
            layers = max(1, fits)
    info["layers"] = layers
    info["full_size_bytes"] = full_size(layers)

    t0 = time.perf_counter()
    if reason is not None:
        info |= {"source": "standin", "standin_reason": reason}
        model: torch.nn.Module = StandIn(llama_footprint(layers), dtype, b.device, DRY_SCALE if b.dry else 1.0)
    else:
        info["source"] = "transformers"
        shape = {**LLAMA3_8B, "num_hidden_layers": layers, **(DRY_OVERRIDES["llm"] if b.dry else {})}
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
        model.to_empty(device=b.device).eval().requires_grad_(False)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.normal_(0.0, 0.02)
    b.sync()
    info["build_s"] = time.perf_counter() - t0
    why = f" ({info['standin_reason']})" if "standin_reason" in info else ""
    print(f"   source: {info['source']}{why}, {layers} layers; built in {info['build_s']:.1f} s")
    info |= swap_round_trips(b, [model])
    return info


def goals(b: Bench) -> dict[str, Any]:
    pinned = b.results.get("sdxl", {}).get("pinned", {})
    checks = [
        (
            "sdxl_restore_within_1_25x_pcie_bound",
            f"SDXL restore within {GOAL_RESTORE_RATIO}x of the PCIe bound",
            pinned.get("restore_ratio_to_pcie_bound"),
            lambda v: v <= GOAL_RESTORE_RATIO,
            lambda v: f"{v:.2f}x",
        ),
        (
            "sdxl_evict_under_50ms",
            f"SDXL eviction under {GOAL_EVICT_S * 1000:.0f} ms",
            pinned.get("evict_s"),
            lambda v: v < GOAL_EVICT_S,
            lambda v: f"{v * 1000:.1f} ms",
        ),
        (
            "sdxl_weights_identical_after_swaps",
            "SDXL weights bitwise identical after evict+restore",
            pinned.get("identical_after_swaps"),
            lambda v: v is True,
            str,
        ),
    ]
    out: dict[str, Any] = {}
    for key, text, value, passes, show in checks:
        if value is None:
            result = "N/A"
        elif b.dry:
            result = f"N/A ({NOT_MEANINGFUL})"
        else:
            result = "PASS" if passes(value) else "FAIL"
        out[key] = {"goal": text, "value": value, "result": result}
        print(f"   {result:<6} {text}" + ("" if value is None else f" ({show(value)})"))
    return out


# -- Entry point ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON results (written after every section)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and an 8-layer LLM (about 1 min)")
    p.add_argument("--skip-llm", action="store_true", help="skip the Llama-3-8B-shaped swap section")
    p.add_argument("--skip-render", action="store_true", help="skip the 1024x1024 render workload")
    p.add_argument("--llm-layers", type=int, default=None, help="LLM layers (default 32; 8 with --quick)")
    p.add_argument("--render-steps", type=int, default=None, help="UNet steps in the render (default 30)")
    p.add_argument("--vae-fp16", action="store_true", help="decode in fp16 (an fp16-fix VAE) instead of fp32")
    p.add_argument("--skip-vae", action="store_true", help="skip the 1024² peaks per VAE and allocator setting")
    p.add_argument(
        "--only-vae", action="store_true", help="only the environment and the 1024² peaks per VAE and allocator"
    )
    p.add_argument("--vae-child", action="store_true", help=argparse.SUPPRESS)  # one peak run, for vae_peaks
    p.add_argument("--standin", action="store_true", help="plain-tensor stand-ins even if diffusers is there")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, any device, results not meaningful")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print(
            f"bench/gpu.py needs a CUDA GPU; torch {torch.__version__} sees none (torch.cuda.is_available() is "
            "False). Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or add --dry-run to "
            "exercise the script on the CPU with tiny sizes.",
            file=sys.stderr,
        )
        return 2
    b = Bench(args)
    if b.dry:
        print(f"DRY RUN on {b.device}: tiny sizes, {NOT_MEANINGFUL}")
        if not b.cuda:
            torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than they save (10-50x here)
    if args.vae_child:
        return vae_child(b)
    b.section("env", lambda: environment(b))
    if args.only_vae:
        b.section("vae_peaks", lambda: vae_peaks(b))
        b.write()
        print(f"\nwrote {args.out} in {b.results['elapsed_s']:.0f} s" + (f"; FAILED: {b.failed}" if b.failed else ""))
        return 1 if b.failed else 0
    b.section("bandwidth", lambda: bandwidth(b))
    b.section("sdxl", lambda: sdxl(b))
    b.results.setdefault("render_1024", {"skipped": "the sdxl section failed before it"})
    b.section("llm", lambda: {"skipped": "--skip-llm"} if args.skip_llm else llm(b))
    b.section("vae_peaks", lambda: {"skipped": "--skip-vae"} if args.skip_vae else vae_peaks(b))
    print("\n== goals ==")
    b.results["goals"] = goals(b)
    b.write()
    print(f"\nwrote {args.out} in {b.results['elapsed_s']:.0f} s" + (f"; FAILED: {b.failed}" if b.failed else ""))
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())
