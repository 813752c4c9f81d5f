"""GPU memory probes and fast weight swaps. Every CUDA call is guarded: on CPU-only torch they raise.

* `budget_bytes()` derives the VRAM ceiling: CLAIR_VRAM_BUDGET_GB, else the device's total less a
  reserve, else 0 ("unknown": the arbiter then lets nothing co-reside).
* `wait_free()` polls device-wide free memory after an eviction: Ollama answers an unload before its
  runner has exited and given the memory back (docs/facts.md, "Ollama").
* `WeightSwap` moves an in-process module (the SDXL pipeline's parts, the local chat model) off and
  onto the GPU. With a pinned host copy made once at load, eviction only re-points the parameters at
  that copy and frees the GPU memory (tens of ms), and restore is one transfer at PCIe speed;
  `.to()` from pageable memory is 10-35x slower (docs/facts.md).

Nothing here decides *whether* to swap: that is the arbiter's job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import psutil
import torch

from clair.errors import EvictionFailed

log = logging.getLogger("clair.gpu")
GiB = 1024**3


def cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda") if cuda() else torch.device("cpu")


def total_bytes() -> int | None:
    if not cuda():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def free_bytes() -> int | None:
    """Free memory on the device, all processes included (Ollama's runner too)."""
    if not cuda():
        return None
    free, _total = torch.cuda.mem_get_info()
    return free


def budget_bytes(budget_gb: float, reserve_gb: float) -> int:
    if budget_gb > 0:
        return int(budget_gb * GiB)
    total = total_bytes()
    if total is None:
        return 0
    return max(0, int(total - reserve_gb * GiB))


def wait_free(nbytes: int, timeout: float, poll: float = 0.05, reserve_gb: float = 1.5) -> float:
    """Block until the device has `nbytes` free; returns the seconds waited. No-op without CUDA.

    Never waits for more than the card can give (its total less the reserve and what this process
    holds): a lone request larger than that runs anyway, alone, as the arbiter decided.
    """
    if not cuda() or nbytes <= 0:
        return 0.0
    t0 = time.monotonic()
    torch.cuda.empty_cache()  # our own cached blocks count as used in mem_get_info
    possible = (total_bytes() or 0) - int(reserve_gb * GiB) - torch.cuda.memory_reserved()
    nbytes = max(0, min(nbytes, possible))
    while True:
        free = free_bytes() or 0
        if free >= nbytes:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise EvictionFailed(
                f"Only {free / GiB:.1f} GiB of GPU memory became free within {timeout:.0f} s, and "
                f"{nbytes / GiB:.1f} GiB are needed. Another program holds the GPU: check `nvidia-smi`."
            )
        time.sleep(poll)


def empty_cache() -> None:
    if cuda():
        torch.cuda.empty_cache()


def reserved_now() -> int:
    return torch.cuda.memory_reserved() if cuda() else 0


def reset_peak() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_reserved() -> int:
    return torch.cuda.max_memory_reserved() if cuda() else 0


def module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    total = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            total += t.numel() * t.element_size()
    return total


def pinned_allowed(mode: str, nbytes: int) -> bool:
    """CLAIR_PINNED_OFFLOAD: pinned memory is locked host RAM, so `auto` checks free RAM first."""
    if mode == "off" or not cuda():
        return False
    if mode == "on":
        return True
    available = psutil.virtual_memory().available
    if nbytes * 2 > available:  # leave the rest of the machine at least as much as we lock
        log.info(
            "pinned offload off: needs %.1f GiB locked, %.1f GiB RAM available; swaps use pageable memory",
            nbytes / GiB,
            available / GiB,
        )
        return False
    return True


class WeightSwap:
    """Moves modules between the GPU and host memory, as fast as the host copy allows.

    Weights never change at inference, so the pinned host copy made at `prepare()` stays valid: evicting
    only re-points each tensor at it, and restoring copies it back in one pass of non-blocking
    transfers. Without CUDA every method is a no-op: the modules live on the CPU anyway.
    """

    def __init__(self, modules: Iterable[torch.nn.Module], pinned_mode: str = "auto"):
        self.modules = [m for m in modules if m is not None]
        self.nbytes = module_bytes(self.modules)
        self.pinned = pinned_allowed(pinned_mode, self.nbytes)
        self._host: dict[int, torch.Tensor] = {}  # id(tensor slot) -> pinned copy
        self.on_gpu = False

    def _tensors(self):
        for m in self.modules:
            yield from m.parameters()
            yield from m.buffers()

    def prepare(self) -> None:
        """Make the pinned host copy (once, at load). Moves nothing to the GPU."""
        if not self.pinned or self._host:
            return
        t0 = time.monotonic()
        for t in self._tensors():
            pinned = t.data.to("cpu").pin_memory()
            self._host[id(t)] = pinned
            if not self.on_gpu:
                t.data = pinned  # the weights live in the pinned copy: one copy in host RAM, not two
        log.info("pinned host copy made gib=%.2f s=%.2f", self.nbytes / GiB, time.monotonic() - t0)

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """The pinned copy of `t`, made now if prepare() did not copy this tensor object.

        Parameters keep their identity through `module.to(dtype)` (diffusers' VAE upcast), but a float buffer
        is replaced by a new object (a Llama's rotary `inv_freq` after `model.half()`, say): its id is then
        unknown (a KeyError half-way through evict(), which left the swap stuck) or recycled from a freed
        tensor. A shape check catches the recycled case. The dtype is deliberately not compared: a VAE left
        fp32 by a failed decode is put back on its fp16 copy, as before.
        """
        host = self._host.get(id(t))
        if host is None or host.shape != t.shape:
            host = self._host[id(t)] = t.data.to("cpu").pin_memory()
        return host

    def restore(self) -> float:
        """Put the weights on the GPU; returns seconds taken."""
        if not cuda() or self.on_gpu:
            return 0.0
        t0 = time.monotonic()
        # Counted as on the GPU from the first tensor moved, so that evict() brings every tensor back.
        self.on_gpu = True
        try:
            if self.pinned:
                self.prepare()
                for t in self._tensors():
                    t.data = self._host_copy(t).to("cuda", non_blocking=True)
                torch.cuda.synchronize()
            else:
                for m in self.modules:
                    m.to("cuda")
        except BaseException:
            # A copy that failed half-way (out of memory) left the modules split across devices with on_gpu
            # True: every later restore() returned at once and the next forward failed on mixed devices until
            # someone evicted. Roll back to all-on-host, then let the caller see the error.
            try:
                self.evict()
            except Exception:
                log.exception("rolling back a failed restore failed")
            raise
        return time.monotonic() - t0

    def evict(self) -> float:
        """Free the GPU memory the weights hold; returns seconds taken."""
        if not cuda() or not self.on_gpu:
            return 0.0
        t0 = time.monotonic()
        if self.pinned:
            for t in self._tensors():
                t.data = self._host_copy(t)  # the copy is identical: weights never change at inference
        else:
            for m in self.modules:
                m.to("cpu")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.on_gpu = False
        return time.monotonic() - t0
