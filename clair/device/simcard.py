"""A simulated GPU card that many processes share, and that says "out of memory" as a CUDA card does.

`CLAIR_SIM_GPU_GB` turns it on (the demo uses 20 by default). Its state is a JSON file
(`CLAIR_SIM_GPU_FILE`, default `sim-gpu.json` in the state folder), read and written under `fcntl.flock`:

    {"total": bytes, "procs": {"<holder>": bytes, ...}, "oom": count, "oom_log": [...last refusals]}

Free memory is the total less every entry. Any process takes memory by raising its own entry and gives it
back by lowering it (`take`/`give_back` below, or the same few lines in another language: the Ollama
stand-in in tests/ has its own). A holder named `name:pid[:...]` whose process is gone is dropped at the
next access, as a real card frees a dead process's memory.

This process's entry is what PyTorch's caching allocator would hold: a CUDA context once the card is first
used, plus the reserved pool. Allocations (`hold` for weights, `transient` for activations) grow the pool
when the cached blocks do not suffice; freed blocks stay reserved until `empty_cache()`. An allocation the
card cannot give first makes the allocator release its cached blocks and retry (as PyTorch's does), then
raises `torch.OutOfMemoryError` with CUDA's message, or, for a first use outside the caching allocator
(cuBLAS's workspace at the first step), a plain `RuntimeError("CUDA error: out of memory ...")`. Every
refusal is counted in the file's `oom`: tests and benchmarks read device OOMs from the card, not from Clair.

The figures (`FIGURES`) are the card's own table of measured ones, with their sources in docs/facts.md
("The simulated card"); nothing here reads Clair's estimates or priors.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from clair.device import card as device
from clair.device.card import Device, Reading

log = logging.getLogger("clair.device.card")

GiB = 1024**3
GB = 1_000_000_000

# --- the card's own measured figures (docs/facts.md, "The simulated card") ---------------------------
FIGURES = {
    # A CUDA context, held by each process from its first use of the card (NVML per-process figure, H200).
    "context": int(0.5 * GiB),
    # SDXL's weights in fp16 by component (H100; 6.94 GB = 6.46 GiB in all).
    "sdxl_unet": int(5.14 * GB),
    "sdxl_text_encoder": int(0.25 * GB),
    "sdxl_text_encoder_2": int(1.39 * GB),
    "sdxl_vae": int(0.17 * GB),
    "sdxl_weights_gib": 6.46,
    # A render's peak above the weights, per size: (w, h) -> (alloc, reserved) GiB for the fp16-safe VAE and
    # the stock one (fp32 decode). H200, 4 steps, CFG 7, batch 1, default allocator.
    "render_peaks": {
        (512, 512): {"fp16": (7.20, 8.10), "stock": (7.96, 9.16)},
        (768, 768): {"fp16": (7.95, 9.42), "stock": (9.44, 11.82)},
        (1216, 832): {"fp16": (8.90, 11.21), "stock": (11.35, 15.28)},
        (1024, 1024): {"fp16": (8.99, 11.35), "stock": (11.53, 15.54)},
        (1536, 1536): {"fp16": (11.96, 16.99), "stock": (17.46, 26.32)},
    },
    # 1536² with VAE tiling (default tiles of 1024²): the decode's peak is about one tile's, +0.5 GiB reserved.
    "tiled_extra_reserved_gib": 0.5,
    # The in-process tiny chat model stands for Qwen2.5-0.5B-Instruct in bf16: 494M parameters, KV cache
    # 24 layers x 2 KV heads x 64 x 2 (K, V) x 2 bytes = 12 KiB per token.
    "chat_weights": 494_032_768 * 2,
    "chat_kv_per_token": 12 * 1024,
    "chat_activation": int(0.1 * GiB),
    # A killed or unloaded CUDA process gives its memory back ~0.1 s after it exits (H200, SIGKILL, 8 GiB).
    "release_lag_s": 0.1,
}


def _mpx(w: int, h: int) -> float:
    return w * h / 1e6


def render_peak(width: int, height: int, vae: str, decode: bool) -> tuple[int, int]:
    """(allocated, reserved) bytes above the weights at width x height: a UNet step (`decode` False: the
    fp16-safe row, whose peak is the denoising loop's), or the VAE decode of `vae` ("fp16" or "stock").
    Piecewise linear in megapixels between the measured rows; the smallest row below them (the safe side),
    the last slope above them."""
    rows = sorted(FIGURES["render_peaks"].items(), key=lambda kv: _mpx(*kv[0]))
    kind = vae if decode else "fp16"
    w0 = FIGURES["sdxl_weights_gib"]
    pts = [(_mpx(*size), v[kind][0] - w0, v[kind][1] - w0) for size, v in rows]
    x = _mpx(width, height)
    if x <= pts[0][0]:
        a, r = pts[0][1], pts[0][2]
    else:
        lo, hi = pts[-2], pts[-1]
        for p, q in itertools.pairwise(pts):
            if x <= q[0]:
                lo, hi = p, q
                break
        t = (x - lo[0]) / (hi[0] - lo[0]) if hi[0] != lo[0] else 1.0
        a, r = lo[1] + t * (hi[1] - lo[1]), lo[2] + t * (hi[2] - lo[2])
    return int(a * GiB), int(max(a, r) * GiB)


def tiled_decode_peak(tile: int, vae: str) -> tuple[int, int]:
    """A tiled decode with tiles of `tile`² pixels: one tile's decode, and a little more reserved."""
    a, r = render_peak(tile, tile, vae, decode=True)
    return a, r + int(FIGURES["tiled_extra_reserved_gib"] * GiB)


# --- the file, shared by processes ------------------------------------------------------------------------
def _alive(holder: str) -> bool:
    parts = holder.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def update(path: str, fn: Callable[[dict], object], total: int | None = None):
    """Run `fn(state)` on the card's state under an exclusive flock; writes it back. Returns fn's result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            raw = f.read()
            try:
                state = json.loads(raw) if raw.strip() else {}
            except ValueError:
                state = {}
            if not isinstance(state, dict):
                state = {}
            if not isinstance(state.get("total"), int):
                state["total"] = int(total if total is not None else 20 * GiB)
            procs = state.get("procs") if isinstance(state.get("procs"), dict) else {}
            state["procs"] = {k: int(v) for k, v in procs.items() if isinstance(v, int) and v > 0 and _alive(k)}
            state.setdefault("oom", 0)
            result = fn(state)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(state))
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return result


def read(path: str) -> dict:
    """The card's state now (a copy)."""
    return update(path, lambda s: json.loads(json.dumps(s)))


def free_of(state: dict) -> int:
    return state["total"] - sum(state["procs"].values())


def held_by(path: str, program: str) -> int:
    """Bytes the holders named `program:...` hold on the card (e.g. "ollama": every runner of Ollama), as a
    per-process reading of a real card would give them (nvidia-smi's process list)."""
    st = read(path)
    return sum(v for k, v in st["procs"].items() if k.split(":", 1)[0] == program)


def take(path: str, holder: str, nbytes: int) -> bool:
    """Another program sets its holding to `nbytes` if the card has room (False, and nothing taken, if not)."""

    def fn(state):
        now = state["procs"].get(holder, 0)
        if nbytes > now and nbytes - now > free_of(state):
            return False
        if nbytes > 0:
            state["procs"][holder] = int(nbytes)
        else:
            state["procs"].pop(holder, None)
        return True

    return update(path, fn)


def give_back(path: str, holder: str) -> None:
    take(path, holder, 0)


_ids = itertools.count(1)


class SimCard(Device):
    """This process's allocator on the simulated card (see the module docstring)."""

    name = "sim"
    present = True
    expandable_segments = False  # its figures were measured under the default allocator (the safe side)

    def __init__(self, path: str, total: int = 20 * GiB, holder: str | None = None):
        self.path = path
        self.holder = holder or f"clair:{os.getpid()}:{next(_ids)}"
        self._lock = threading.RLock()
        self._holds: dict[str, int] = {}
        self._transient = 0
        self._reserved = 0
        self._touched = False
        self._first_used: set[str] = set()
        self._peak_reserved = 0
        self._peak_allocated = 0
        st = update(path, lambda s: dict(s), total=total)
        self.total = st["total"]
        self.name = f"simulated {self.total / GiB:.0f} GB card"

    # -- figures ----------------------------------------------------------------------------------
    def _allocated(self) -> int:
        return sum(self._holds.values()) + self._transient

    def _entry(self) -> int:
        return (FIGURES["context"] if self._touched else 0) + self._reserved

    def reading(self) -> Reading:
        with self._lock:
            st = read(self.path)
            return Reading(st["total"], free_of(st), self._reserved, self._allocated())

    def allocated(self) -> int:
        with self._lock:
            return self._allocated()

    def reserved(self) -> int:
        with self._lock:
            return self._reserved

    def peak_reserved(self) -> int:
        return self._peak_reserved

    def peak_allocated(self) -> int:
        return self._peak_allocated

    def reset_peak(self) -> None:
        with self._lock:
            self._peak_reserved, self._peak_allocated = self._reserved, self._allocated()

    def oom_count(self) -> int:
        return int(read(self.path).get("oom", 0))

    # -- the allocator ----------------------------------------------------------------------------
    def _publish(self) -> None:
        entry = self._entry()

        def fn(state):
            if entry > 0:
                state["procs"][self.holder] = entry
            else:
                state["procs"].pop(self.holder, None)

        update(self.path, fn)

    def empty_cache(self) -> None:
        with self._lock:
            if self._reserved != self._allocated():
                self._reserved = self._allocated()
                self._publish()

    def _allocate(self, nbytes: int, slack: int, first_use: str) -> None:
        """Make `nbytes` allocated (plus `slack` reserved beside it), growing the pool if need be."""
        import torch

        with self._lock:
            allocated = self._allocated()
            want = allocated + nbytes + slack
            outside = bool(first_use) and first_use not in self._first_used  # e.g. cuBLAS's workspace

            def fn(state):
                touched = self._touched
                ctx = 0 if touched else FIGURES["context"]
                growth = max(0, want - self._reserved) + ctx
                free = free_of(state)
                if growth > free and not outside and self._reserved > allocated:
                    # PyTorch's allocator frees its cached blocks and tries again before it gives up.
                    freed = self._reserved - allocated
                    self._reserved = allocated
                    state["procs"][self.holder] = state["procs"].get(self.holder, 0) - freed
                    growth = max(0, want - self._reserved) + ctx
                    free = free_of(state)
                if growth > free:
                    state["oom"] = int(state.get("oom", 0)) + 1
                    log_ = state.setdefault("oom_log", [])
                    log_.append({
                        "holder": self.holder, "need": growth, "free": free, "first_use": outside,
                        "procs": dict(state["procs"]),  # who held the card when it said no
                        "at": time.time(),
                    })
                    del log_[:-20]
                    return free, growth
                self._touched = True
                self._reserved = max(self._reserved, want)
                state["procs"][self.holder] = self._entry()
                return None

            refused = update(self.path, fn)
            if refused is not None:
                free, growth = refused
                if outside or (not self._touched and free < FIGURES["context"]):  # no room for a CUDA context
                    raise RuntimeError(
                        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other "
                        "API call, so the stacktrace below might be incorrect."
                        if not first_use.startswith("cublas")
                        else "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
                    )
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {growth / GiB:.2f} GiB. GPU 0 has a total capacity of "
                    f"{self.total / GiB:.2f} GiB of which {free / GiB:.2f} GiB is free. Including non-PyTorch memory, "
                    f"this process has {self._entry() / GiB:.2f} GiB memory in use. Of the allocated memory "
                    f"{allocated / GiB:.2f} GiB is allocated by PyTorch, and {(self._reserved - allocated) / GiB:.2f} "
                    "GiB is reserved by PyTorch but unallocated. (simulated card)"
                )
            if first_use:
                self._first_used.add(first_use)
            self._peak_reserved = max(self._peak_reserved, self._reserved)
            self._peak_allocated = max(self._peak_allocated, allocated + nbytes)

    def hold(self, key: str, nbytes: int) -> None:
        with self._lock:
            now = self._holds.get(key, 0)
            if nbytes > now:
                self._allocate(nbytes - now, 0, "")
            self._holds[key] = nbytes

    def drop(self, key: str) -> None:
        with self._lock:
            self._holds.pop(key, None)

    @contextlib.contextmanager
    def transient(self, nbytes: int, slack: int = 0, first_use: str = "") -> Iterator[None]:
        with self._lock:
            self._allocate(nbytes, slack, first_use)
            self._transient += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._transient -= nbytes

    def declared_bytes(self, module) -> int | None:
        declared = getattr(module, "sim_bytes", None)
        return int(declared) if isinstance(declared, int) else None

    def close(self) -> None:
        """Give everything back (a test's end, a process that exits)."""
        with self._lock:
            self._holds.clear()
            self._transient = 0
            self._reserved = 0
            self._touched = False
            give_back(self.path, self.holder)


# -- configuring the cards from Clair's settings (device.py lists them; only this module knows SimCard) ----


def card_path(path: str, index: int) -> str:
    """The state file of simulated card `index`: card 0's is `path` itself (as with one card), card i's
    is `path` with -i before its extension (sim-gpu.json, sim-gpu-1.json, ...)."""
    if index == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{index}{ext}"


def configure_cards(sizes_gb: tuple[float, ...] | list[float], sim_gpu_file: str) -> list[Device]:
    """Set up every card from CLAIR_SIM_GPU_GB's sizes (Config.sim_gpu_sizes): card 0 exactly as `configure`
    does with one size, and a simulated card, with its own state file, for each further size. Returns them."""
    sizes = list(sizes_gb)
    first = configure(sizes[0] if sizes else 0.0, sim_gpu_file)
    if len(sizes) <= 1:
        return [first]
    path = os.path.abspath(os.path.expanduser(sim_gpu_file))
    more: list[Device] = [SimCard(card_path(path, i), total=int(gb * GiB)) for i, gb in enumerate(sizes) if i]
    device.set_cards([first, *more])
    log.info("simulated GPU cards=%d sizes_gib=%s", len(sizes), ",".join(f"{gb:g}" for gb in sizes))
    return [first, *more]


def configure(sim_gpu_gb: float, sim_gpu_file: str) -> Device:
    """Set the device from Clair's settings: a simulated card when CLAIR_SIM_GPU_GB > 0, else CUDA or none.

    An existing simulated card on the same file is kept (several Studios in one process share it)."""
    dev = device.current()
    if sim_gpu_gb > 0:
        path = os.path.abspath(os.path.expanduser(sim_gpu_file))
        if isinstance(dev, SimCard) and dev.path == path:
            return dev
        card = SimCard(path, total=int(sim_gpu_gb * GiB))
        device.install(card)
        log.info("simulated GPU card=%s total_gib=%.1f", path, sim_gpu_gb)
        return card
    if not isinstance(dev, device.CudaDevice) and dev.present:  # a simulated card from an earlier configuration
        device.install(None)
    return device.current()
