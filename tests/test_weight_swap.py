"""WeightSwap's re-pointing logic, run on every machine: the device is a parameter.

On `"cpu"` the device copy is a second host tensor: a forward pass runs on it, and wrecking it proves that
eviction puts back the host copy. (`"meta"` cannot stand in: torch refuses to re-point `.data` between a
meta and a dense tensor.) What only a GPU shows (pinned memory, PCIe speed) is measured by bench/gpu.py.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from clair.device import gpu


class Tied(nn.Module):
    """An embedding tied to its output head (as in most LMs), a norm with buffers, and a fp16-able body."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)  # buffers: running_mean, running_var, num_batches_tracked
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.embed(ids))) * self.scale)


def _seeded(seed: int = 0) -> Tied:
    torch.manual_seed(seed)
    m = Tied()
    with torch.no_grad():  # non-trivial buffers, so a buffer lost on the way is noticed
        m.norm.running_mean.uniform_(-1, 1)
        m.norm.running_var.uniform_(0.5, 2)
    return m


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict(keep_vars=True).items()}


def _bit_identical(m: nn.Module, ref: dict[str, torch.Tensor]) -> None:
    now = m.state_dict(keep_vars=True)
    assert now.keys() == ref.keys()
    for k, v in now.items():
        assert v.dtype == ref[k].dtype, k
        assert v.device.type == "cpu", k
        # Compare raw bytes: torch.equal treats -0.0 == 0.0 and fails on NaN.
        assert v.detach().reshape(-1).view(torch.uint8).equal(ref[k].reshape(-1).view(torch.uint8)), k


def test_round_trips_on_cpu_repoint_data_and_keep_parameter_objects() -> None:
    m = _seeded()
    ref = _snapshot(m)
    ids = torch.tensor([[1, 2, 3]]).reshape(-1)
    expected = m(ids)
    params = {name: p for name, p in m.named_parameters()}
    buffers = {name: b for name, b in m.named_buffers()}
    swap = gpu.WeightSwap([m, None], pinned_mode="on", device="cpu")
    assert swap.active and swap.host_copy and not swap.pinned  # pinning needs CUDA; the copy does not
    assert swap.nbytes == gpu.module_bytes([m])
    swap.prepare()
    host = {name: p.data for name, p in m.named_parameters()}  # after prepare() the weights live in the copy

    for _ in range(5):
        assert swap.restore() >= 0
        assert swap.on_gpu
        for name, p in m.named_parameters():
            assert p is params[name]  # the same Parameter objects...
            assert p.data.data_ptr() != host[name].data_ptr()  # ...pointing at a device copy of their own
            assert p.requires_grad
        assert m.head.weight is m.embed.weight  # tied weights stay one Parameter on the device
        assert torch.equal(m(ids), expected)  # the device copy computes what the host copy did
        assert swap.restore() == 0.0  # already there: nothing to do
        swap.evict()
        assert not swap.on_gpu
        for name, p in m.named_parameters():
            assert p is params[name]
            assert p.data.data_ptr() == host[name].data_ptr()  # re-pointed at the host copy, not copied
        for name, b in m.named_buffers():
            assert b is buffers[name]
        _bit_identical(m, ref)
    assert swap.evict() == 0.0


def test_the_weights_come_back_from_the_host_copy_not_the_device_copy() -> None:
    m = _seeded(1)
    ref = _snapshot(m)
    swap = gpu.WeightSwap([m], pinned_mode="auto", device="cpu")
    swap.prepare()
    for _ in range(3):
        swap.restore()
        with torch.no_grad():  # wreck the device copy: whatever evict() keeps must come from elsewhere
            for t in [*m.parameters(), *m.buffers()]:
                t.data.zero_() if not t.dtype.is_floating_point else t.data.fill_(float("nan"))
        assert m.head.weight is m.embed.weight
        swap.evict()
        _bit_identical(m, ref)


def test_tied_weights_are_counted_and_moved_once() -> None:
    m = _seeded()
    shared = nn.Linear(4, 4)
    a, b = nn.Sequential(shared), nn.Sequential(shared, nn.ReLU())  # two modules that share a layer
    swap = gpu.WeightSwap([m, a, b], pinned_mode="on", device="cpu")
    untied = sum(p.numel() * p.element_size() for p in [*(p for _, p in m.named_parameters(remove_duplicate=False)), *m.buffers()])
    assert swap.nbytes == gpu.module_bytes([m]) + (4 * 4 + 4) * 4  # the shared layer once
    assert gpu.module_bytes([m]) == untied - 16 * 8 * 4  # the tied head is not counted twice
    swap.prepare()
    assert len(swap._host) == len({id(t) for t in [*m.parameters(), *m.buffers(), *shared.parameters()]})
    assert swap.host_bytes() == swap.nbytes


def test_fp32_upcast_after_restore_comes_back_bit_identical_in_its_current_dtype() -> None:
    """The VAE case: weights loaded fp16, upcast to fp32 on the device for decoding, evicted while fp32."""
    vae = _seeded(2).half()
    swap = gpu.WeightSwap([vae], pinned_mode="on", device="cpu")
    swap.prepare()
    swap.restore()
    vae.to(dtype=torch.float32)  # diffusers' upcast: same Parameter objects, new fp32 data
    upcast = _snapshot(vae)
    swap.evict()
    _bit_identical(vae, upcast)  # not silently put back on the fp16 copy
    for _ in range(3):
        swap.restore()
        swap.evict()
        _bit_identical(vae, upcast)
    # Cast back to fp16 on the device (what the pipeline does after decoding): the fp16 values return.
    swap.restore()
    vae.to(dtype=torch.float16)
    down = _snapshot(vae)
    swap.evict()
    _bit_identical(vae, down)
    assert swap.host_bytes() == gpu.module_bytes([vae])  # the fp32 copies were let go, not kept beside


def test_a_replaced_buffer_gets_a_copy_and_the_old_copy_is_let_go() -> None:
    m = _seeded(3)
    swap = gpu.WeightSwap([m], pinned_mode="on", device="cpu")
    swap.prepare()
    swap.restore()
    old_copy = weakref.ref(swap._host[id(m.scale)][1])
    m.scale = torch.full((8,), 2.0)  # a new buffer object (what model.half() does to float buffers)
    swap.evict()
    assert torch.equal(m.scale, torch.full((8,), 2.0))
    swap.restore()
    swap.evict()
    gc.collect()
    assert old_copy() is None  # no copy kept for a tensor that is gone
    assert swap.host_bytes() == gpu.module_bytes([m])


def test_no_host_copy_outlives_a_replaced_model() -> None:
    m = _seeded(4)
    swap = gpu.WeightSwap([m], pinned_mode="on", device="cpu")
    swap.prepare()
    swap.restore()
    swap.evict()
    copies = [weakref.ref(h) for _, h in swap._host.values()]
    module = weakref.ref(m)
    assert all(c() is not None for c in copies)
    swap = gpu.WeightSwap([_seeded(5)], pinned_mode="on", device="cpu")  # the model is replaced
    del m
    gc.collect()
    assert module() is None
    assert [c for c in copies if c() is not None] == []


def test_pageable_mode_moves_modules_with_to() -> None:
    m = _seeded(6)
    ref = _snapshot(m)
    swap = gpu.WeightSwap([m], pinned_mode="off", device="cpu")
    assert not swap.host_copy
    swap.prepare()
    assert swap._host == {}  # no second copy
    swap.restore()
    assert swap.on_gpu
    swap.evict()
    _bit_identical(m, ref)


def test_a_failed_restore_rolls_back_to_the_host() -> None:
    m = _seeded(7)
    ref = _snapshot(m)
    swap = gpu.WeightSwap([m], pinned_mode="on", device="cpu")
    swap.prepare()
    calls = {"n": 0}
    real = torch.Tensor.to

    def flaky_to(self, *args, **kwargs):
        if kwargs.get("copy"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", flaky_to)
        with pytest.raises(torch.OutOfMemoryError):
            swap.restore()
    assert not swap.on_gpu
    _bit_identical(m, ref)
    swap.restore()  # and the next restore works
    assert swap.on_gpu


def test_without_a_device_every_method_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "cuda", lambda: False)
    m = _seeded()
    swap = gpu.WeightSwap([m], pinned_mode="on")
    assert not swap.active and not swap.pinned
    swap.prepare()
    assert swap.restore() == 0.0 and swap.evict() == 0.0
    assert swap._host == {}
