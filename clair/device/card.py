"""The one place Clair asks a GPU about memory, and the devices that answer: none, CUDA, a simulated card.

Everything in Clair that needs a memory figure or an allocator action goes through `current()`:

* `reading()`: the card's total, free memory as every process sees it, and this process's allocated and
  reserved bytes, **read together** (a free figure and a reserved figure read at different moments
  invent a phantom "other program" for as long as a render allocates in between);
* `peak_reserved()` / `peak_allocated()` / `reset_peak()`, `empty_cache()`;
* allocation hooks (`hold`/`drop` for weights, `transient` for activations) through which a stand-in
  model (clair/engines/tiny.py) declares what the real model would take. On CUDA they do nothing: real tensors
  count themselves. On the simulated card they are the allocations.

`NoDevice` (CPU-only torch, no simulated card) answers "unknown". `CudaDevice` wraps `torch.cuda`.
`SimCard` (clair/device/simcard.py, `CLAIR_SIM_GPU_GB`) is a card shared with other processes through a
JSON file, that says "out of memory" as CUDA does; it subclasses `Device`, so it also owns configuring
the cards from Clair's settings (`simcard.configure`), and this module never imports it. Clair's code
never asks which one it has.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("clair.device.card")
GiB = 1024**3

# Messages CUDA gives for allocations outside PyTorch's caching allocator (cuBLAS/cuDNN workspaces, lazily
# loaded kernels): a plain RuntimeError, not torch.OutOfMemoryError (docs/facts.md, "Out of memory").
_OOM_TEXT = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cuda_error_out_of_memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for every way a CUDA device says it has no memory left, caching allocator or not."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(t in text for t in _OOM_TEXT)
    return False


@dataclass(frozen=True)
class Reading:
    """One consistent look at the card: `free` is device-wide, `reserved`/`allocated` are this process's."""

    total: int
    free: int
    reserved: int
    allocated: int

    @property
    def others(self) -> int:
        """Bytes in use that this process's allocator does not hold (other programs, CUDA contexts)."""
        return max(0, self.total - self.free - self.reserved)


class Device:
    """No GPU: every figure is unknown (None) or 0, every action a no-op."""

    name = "none"
    present = False  # a device answers memory questions (CUDA, or the simulated card)
    expandable_segments = False

    @property
    def tensor_device(self):
        """Where tensors go to run on this device (None: they stay on the CPU)."""
        return None

    def reading(self) -> Reading | None:
        return None

    def allocated(self) -> int:
        return 0

    def reserved(self) -> int:
        return 0

    def peak_reserved(self) -> int:
        return 0

    def peak_allocated(self) -> int:
        return 0

    def reset_peak(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    # -- allocation hooks: what a stand-in model declares (real tensors count themselves) ------------
    def hold(self, key: str, nbytes: int) -> None:
        """`key`'s weights now take `nbytes` on the device (raises out of memory when they cannot)."""

    def drop(self, key: str) -> None:
        """`key`'s weights left the device (their blocks stay cached until `empty_cache`)."""

    @contextlib.contextmanager
    def transient(self, nbytes: int, slack: int = 0, first_use: str = "") -> Iterator[None]:
        """Activations of `nbytes` for the duration of the block, reserving `slack` more (fragmentation)."""
        yield

    def declared_bytes(self, module) -> int | None:
        """The bytes a stand-in `module` declares its weights take on this device (None: its own bytes)."""
        return None


class CudaDevice(Device):
    """torch.cuda, device 0."""

    name = "cuda"
    present = True

    def __init__(self) -> None:
        import torch

        self._torch = torch
        props = torch.cuda.get_device_properties(0)
        self.name = f"cuda:{props.name}"
        self._total = int(props.total_memory)
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") or os.environ.get("PYTORCH_ALLOC_CONF", "")
        self.expandable_segments = "expandable_segments:true" in conf.replace(" ", "").lower()

    @property
    def tensor_device(self):
        return self._torch.device("cuda")

    def reading(self) -> Reading:
        cuda = self._torch.cuda
        # mem_get_info is one driver call; our reserved figure can change between it and the allocator's
        # counter when another thread allocates. Read reserved on both sides until they agree.
        for _ in range(5):
            before = cuda.memory_reserved()
            free, total = cuda.mem_get_info()
            allocated = cuda.memory_allocated()
            after = cuda.memory_reserved()
            if before == after:
                break
        return Reading(int(total), int(free), int(after), int(allocated))

    def allocated(self) -> int:
        return int(self._torch.cuda.memory_allocated())

    def reserved(self) -> int:
        return int(self._torch.cuda.memory_reserved())

    def peak_reserved(self) -> int:
        return int(self._torch.cuda.max_memory_reserved())

    def peak_allocated(self) -> int:
        return int(self._torch.cuda.max_memory_allocated())

    def reset_peak(self) -> None:
        self._torch.cuda.reset_peak_memory_stats()

    def empty_cache(self) -> None:
        self._torch.cuda.empty_cache()

    def synchronize(self) -> None:
        self._torch.cuda.synchronize()


_lock = threading.Lock()
_current: Device | None = None


def current() -> Device:
    """The device this process uses: the one `install()`ed or `configure()`d, else CUDA when present."""
    global _current
    dev = _current
    if dev is None:
        with _lock:
            if _current is None:
                _current = _detect()
            dev = _current
    return dev


def _detect() -> Device:
    import torch

    if torch.cuda.is_available():
        return CudaDevice()
    return Device()


def install(dev: Device | None) -> Device | None:
    """Make `dev` the device (None: detect again at the next `current()`). Returns the previous one.

    It is card 0 from now on: other cards `set_cards()` listed are forgotten."""
    global _current
    with _lock:
        old, _current = _current, dev
        _cards.clear()
    return old


# -- several cards ---------------------------------------------------------------------------------------
# Today Clair runs on card 0 (`current()`); the cards beyond it are listed and read here so that placement
# (clair/arbiter/placement.py) and the panel can see them, before the worker processes that will run on them exist.
# Real CUDA cards are not enumerated in this process: the web process is not to initialise CUDA once the
# workers exist (docs/design.md, "Several cards and worker processes"); each worker reads its own card.
_cards: list[Device] = []


def set_cards(listed: list[Device]) -> None:
    """List every card, card 0 first (clair/device/simcard.py's `configure_cards`); card 0 must be `current()`."""
    with _lock:
        _cards[:] = listed


def cards() -> list[Device]:
    """Every card Clair knows, card 0 (`current()`) first."""
    with _lock:
        listed = list(_cards)
    return listed or [current()]


def readings() -> list[Reading | None]:
    """Each card's reading, in card order (None where a card cannot say)."""
    return [card.reading() for card in cards()]
