"""GPU memory probes and fast weight swaps. Every CUDA call is guarded: on CPU-only torch they raise.

* `budget_bytes()` derives the VRAM ceiling: CLAIR_VRAM_BUDGET_GB, else the device's total less a
  reserve, else 0 ("unknown": the arbiter then lets nothing co-reside).
* `wait_free()` polls device-wide free memory after an eviction: Ollama answers an unload before its
  runner has exited and given the memory back (docs/facts.md, "Ollama").
* `WeightSwap` moves an in-process module (the SDXL pipeline's parts, the local chat model) off and
  onto the GPU. With a pinned host copy made once at load, eviction only re-points the parameters at
  that copy and frees the GPU memory (tens of ms), and restore is one transfer at PCIe speed;
  `.to()` from pageable memory is 10-35x slower (docs/facts.md). The device is a parameter, so the same
  re-pointing code runs on CPU in the tests (tests/test_weight_swap.py).

Nothing here decides *whether* to swap: that is the arbiter's job.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable

import psutil
import torch

from clair.base.errors import EvictionFailed
from clair.device import card as _device

log = logging.getLogger("clair.device.gpu")
GiB = 1024**3


def dev() -> _device.Device:
    """The device Clair uses (clair/device/card.py): CUDA, the simulated card, or none."""
    return _device.current()


def cuda() -> bool:
    """True only for a real CUDA device (tensors then move to it); see `present()` for memory questions."""
    return dev().tensor_device is not None


def present() -> bool:
    """A device answers memory questions: CUDA, or the simulated card (CLAIR_SIM_GPU_GB)."""
    return dev().present


def device() -> torch.device:
    return dev().tensor_device or torch.device("cpu")


def reading() -> _device.Reading | None:
    """Total, free (every process), and this process's reserved and allocated, read together."""
    return dev().reading()


def total_bytes() -> int | None:
    r = reading()
    return r.total if r else None


def free_bytes() -> int | None:
    """Free memory on the device, all processes included (Ollama's runner too)."""
    r = reading()
    return r.free if r else None


def budget_bytes(budget_gb: float, reserve_gb: float, card: _device.Device | None = None) -> int:
    """The budget of `card` (default: the first card)."""
    if budget_gb > 0:
        return int(budget_gb * GiB)
    r = (card or dev()).reading()
    total = r.total if r else None
    if total is None:
        return 0
    return max(0, int(total - reserve_gb * GiB))


def wait_free(
    nbytes: int,
    timeout: float,
    poll: float = 0.05,
    reserve_gb: float = 1.5,
    others: Callable[[], int] = lambda: 0,
    settle_s: float = 5.0,
    card: _device.Device | None = None,
) -> float:
    """Block until the device has `nbytes` free; returns the seconds waited. No-op without a device.

    Never waits for more than can come: the card's total less the reserve, what this process holds, and
    `others()`, the memory other programs hold that no eviction of ours gives back (the ledger's "other"
    tenant). And once free memory has not risen for `settle_s` seconds (Ollama's own scheduler waits at most
    5 s for a runner's VRAM to come back: docs/facts.md, "Ollama"), it stops waiting: a lone request then runs anyway, alone, as the arbiter decided, and an out-of-memory
    error heals as any other (clair/engines/image.py). Raises EvictionFailed only when memory was still coming in
    at `timeout`.
    """
    d = card or dev()  # `card`: one of several cards (device.cards()); default the first
    if not d.present or nbytes <= 0:
        return 0.0
    t0 = time.monotonic()
    d.empty_cache()  # our own cached blocks count as used by every other process
    first = d.reading()
    assert first is not None
    possible = first.total - int(reserve_gb * GiB) - first.reserved - max(0, others())
    nbytes = max(0, min(nbytes, possible))
    best, best_at = first.free, t0
    while True:
        r = d.reading()
        assert r is not None
        if r.free >= nbytes:
            return time.monotonic() - t0
        now = time.monotonic()
        if r.free > best:
            best, best_at = r.free, now
        elif now - best_at > settle_s:
            log.warning(
                "stopped waiting for GPU memory: %.1f GiB free, %.1f GiB wanted, no change for %.0f s; "
                "another program holds the rest",
                r.free / GiB,
                nbytes / GiB,
                settle_s,
            )
            return now - t0
        if now - t0 > timeout:
            raise EvictionFailed(
                f"Only {r.free / GiB:.1f} GiB of GPU memory became free within {timeout:.0f} s, and "
                f"{nbytes / GiB:.1f} GiB are needed. Another program holds the GPU: check `nvidia-smi`."
            )
        time.sleep(poll)


def empty_cache() -> None:
    dev().empty_cache()


def reserved_now() -> int:
    return dev().reserved()


def reset_peak() -> None:
    dev().reset_peak()


def peak_reserved() -> int:
    return dev().peak_reserved()


# In-process GPU activity other than a render's own (a weight swap, the in-process chat model generating):
# a render whose run saw any of it learns nothing from its peak (ImageEngine's footprint).
_activity = itertools.count()
_activity_now = 0


_busy = 0
_busy_lock = threading.Lock()


def note_activity() -> int:
    """Record that something else used this process's GPU memory; returns the new mark."""
    global _activity_now
    _activity_now = next(_activity) + 1
    return _activity_now


def begin_use() -> None:
    """Another in-process user (the in-process chat model generating) starts using the device."""
    global _busy
    with _busy_lock:
        _busy += 1
    note_activity()


def end_use() -> None:
    global _busy
    with _busy_lock:
        _busy = max(0, _busy - 1)
    note_activity()


def activity_mark() -> int | None:
    """A mark that changes whenever another in-process user touches the device; None while one is at work."""
    return None if _busy else _activity_now


def module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers, each tensor counted once (tied weights are one)."""
    total = 0
    for t in _unique_tensors(modules):
        total += t.numel() * t.element_size()
    return total


def _unique_tensors(modules: Iterable[torch.nn.Module]):
    """Every parameter and buffer of `modules` once, even when modules share (tie) a Parameter object."""
    seen: set[int] = set()
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                yield t


def declared_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """What the modules' weights take on the device: their bytes on CUDA; on the simulated card what a
    stand-in module declares for the real model it stands for (clair/engines/tiny.py), else their bytes."""
    d = dev()
    modules = list(modules)
    declared = [d.declared_bytes(m) for m in modules]
    rest = [m for m, n in zip(modules, declared, strict=True) if n is None]
    return sum(n for n in declared if n is not None) + module_bytes(rest)  # tied weights counted once


def pinned_footprint(modules: Iterable[torch.nn.Module]) -> int:
    """Host RAM that per-tensor pinned copies lock: PyTorch's pinned (host) caching allocator rounds each
    block up to a power of two (docs/facts.md, "Pinned memory"), so 1.5 MiB locks 2 MiB."""
    return sum(_pinned_block(t.numel() * t.element_size()) for t in _unique_tensors(modules))


def _pinned_block(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length()) if n > 0 else 0


def pinned_allowed(mode: str, nbytes: int, available: int | None = None, on_cuda: bool | None = None) -> bool:
    """CLAIR_PINNED_OFFLOAD: pinned memory is locked host RAM, so `auto` checks free RAM first.

    `nbytes` is what pinning locks (`pinned_footprint`, rounded as the pinned allocator rounds)."""
    if mode == "off" or not (cuda() if on_cuda is None else on_cuda):
        return False
    if mode == "on":
        return True
    available = psutil.virtual_memory().available if available is None else available
    if nbytes * 2 > available:  # leave the rest of the machine at least as much as we lock
        log.info(
            "pinned offload off: needs %.1f GiB locked, %.1f GiB RAM available; swaps use pageable memory",
            nbytes / GiB,
            available / GiB,
        )
        return False
    return True


class WeightSwap:
    """Moves modules between a device (the GPU) and host memory, as fast as the host copy allows.

    Weights never change at inference, so the host copy made at `prepare()` stays valid: evicting only
    re-points each tensor's `.data` at it (the `nn.Parameter` objects stay the same objects, so tied
    weights stay tied and optimisers/hooks keep their references), and restoring copies it back in one
    pass of non-blocking transfers.

    `device` is where restore() puts the weights: None means CUDA when there is one, else nothing to do
    (the modules live on the CPU anyway; every method returns at once). Any other device runs the same
    re-pointing code: the tests use `"cpu"`, where the device copy is a second host tensor,
    so the logic behind the fast swap runs in every test run. Only pinning (`pin_memory()`) and the
    transfer speed need a GPU; bench/gpu.py measures those.

    Modes (`pinned_mode`, CLAIR_PINNED_OFFLOAD): with a host copy ("on", or "auto" when RAM allows) eviction
    re-points and restore copies; "off" moves the modules with `.to()` (no second copy held while the
    weights are on the device, at pageable speed). On a CUDA device the host copy is pinned.
    """

    def __init__(
        self,
        modules: Iterable[torch.nn.Module],
        pinned_mode: str = "auto",
        device: str | torch.device | None = None,
    ):
        self.modules = [m for m in modules if m is not None]
        self.host_nbytes = module_bytes(self.modules)
        # What the weights take on the device (the simulated card: what a stand-in declares).
        self.nbytes = declared_bytes(self.modules)
        self._key = f"weights:{id(self)}"
        if device is None:
            self.device = dev().tensor_device
        else:
            self.device = torch.device(device)
        on_cuda = self.device is not None and self.device.type == "cuda"
        if on_cuda:
            self.host_copy = pinned_allowed(pinned_mode, pinned_footprint(self.modules), on_cuda=True)
        else:
            self.host_copy = self.device is not None and pinned_mode != "off"
        self.pinned = self.host_copy and on_cuda  # page-locked host memory: only a CUDA device has it
        # id(tensor) -> (the tensor itself, weakly, and its host copy). The weak reference tells a live
        # tensor from a new one that reuses a freed tensor's id.
        self._host: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self.on_gpu = False  # the weights are on `device` (the name predates non-CUDA devices)

    @property
    def active(self) -> bool:
        """False when there is no device to swap to (CPU-only torch, no simulated card, no device given)."""
        return self.device is not None or dev().present

    def _tensors(self):
        return _unique_tensors(self.modules)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = t.data.to("cpu")
        return host.pin_memory() if self.pinned else host

    def prepare(self) -> None:
        """Make the host copy (once, at load). Moves nothing to the device."""
        if not self.host_copy or self._host:
            return
        t0 = time.monotonic()
        for t in self._tensors():
            host = self._to_host(t)
            self._host[id(t)] = (weakref.ref(t), host)
            if not self.on_gpu:
                t.data = host  # the weights live in the host copy: one copy in host RAM, not two
        log.info(
            "host copy made pinned=%s gib=%.2f s=%.2f", self.pinned, self.nbytes / GiB, time.monotonic() - t0
        )

    def _host_copy(self, t: torch.Tensor, live: dict) -> torch.Tensor:
        """The host copy of `t` in t's current dtype, made now if there is none for this tensor object.

        Parameters keep their identity through `module.to(dtype)` (diffusers' VAE upcast), but a float buffer
        is replaced by a new object (a Llama's rotary `inv_freq` after `model.half()`, say): it gets a copy
        of its own, and the old object's copy is dropped (`live` keeps only the tensors seen in this pass).
        A tensor whose dtype changed since its copy was made (a VAE cast to fp32 after restore) is copied
        back from the device as it is now, so a round trip returns it bit-identical in its current dtype.
        """
        entry = self._host.get(id(t))
        if entry is None or entry[0]() is not t or entry[1].dtype != t.dtype or entry[1].shape != t.shape:
            entry = (weakref.ref(t), self._to_host(t))
        live[id(t)] = entry
        return entry[1]

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            dev().synchronize()

    def restore(self) -> float:
        """Put the weights on the device; returns seconds taken."""
        if not self.active or self.on_gpu:
            return 0.0
        t0 = time.monotonic()
        note_activity()
        # Counted as on the device from the first tensor moved, so that evict() brings every tensor back.
        self.on_gpu = True
        try:
            dev().hold(self._key, self.nbytes)  # the simulated card's allocation (CUDA: the tensors' own)
            if self.device is None:
                pass  # the simulated card: the arithmetic stays on the CPU
            elif self.host_copy:
                self.prepare()
                live: dict = {}
                for t in self._tensors():
                    host = self._host_copy(t, live)
                    # copy=True: to a "cpu" device the copy must still be a tensor of its own.
                    t.data = host.to(self.device, non_blocking=self.pinned, copy=True)
                self._host = live
                self._sync()
            else:
                for m in self.modules:
                    m.to(self.device)
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
        """Free the device memory the weights hold; returns seconds taken."""
        if not self.active or not self.on_gpu:
            return 0.0
        t0 = time.monotonic()
        note_activity()
        dev().drop(self._key)
        if self.device is None:
            pass  # the simulated card: nothing moves
        elif self.host_copy:
            live: dict = {}
            for t in self._tensors():
                t.data = self._host_copy(t, live)  # the copy is identical: weights never change at inference
            self._host = live  # copies of tensors no longer in the modules are let go
        else:
            for m in self.modules:
                m.to("cpu")
        self._sync()
        dev().empty_cache()  # the freed blocks go back to the card, for every other process
        self.on_gpu = False
        return time.monotonic() - t0

    def host_bytes(self) -> int:
        """Bytes held in host copies now (for the leak checks)."""
        return sum(h.numel() * h.element_size() for _, h in self._host.values())
