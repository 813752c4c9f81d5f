"""The device interface (clair/device/card.py), run against the simulated card and, where there is one, CUDA.

The same tests for both: what Clair relies on a card to do. The CUDA runs are marked `gpu` and skipped,
visibly, without a CUDA device (`pytest -m gpu` on a GPU machine). Then the simulated card's own behaviour:
a file shared by processes, refusals counted in it, the first-use error CUDA gives outside its allocator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from clair.device import card as device
from clair.device import gpu, simcard
from clair.device.simcard import GiB, SimCard

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2


class Sim:
    """Allocations on the simulated card through its hooks (what a stand-in model does)."""

    def __init__(self, tmp_path: Path):
        self.dev = SimCard(str(tmp_path / "card.json"), total=20 * GiB)
        self.unit = GiB  # sizes in the tests are in units of this

    def alloc(self, key: str, n: float):
        self.dev.hold(key, int(n * self.unit))
        return key

    def free(self, handle) -> None:
        self.dev.drop(handle)

    def close(self) -> None:
        self.dev.close()


class Cuda:
    """Real tensors on CUDA: the device must answer for them without any hook."""

    def __init__(self, tmp_path: Path):
        self.dev = device.CudaDevice()
        self.unit = 256 * MiB
        self.held: dict[str, torch.Tensor] = {}

    def alloc(self, key: str, n: float):
        self.held[key] = torch.empty(int(n * self.unit), dtype=torch.uint8, device="cuda")
        return key

    def free(self, handle) -> None:
        del self.held[handle]

    def close(self) -> None:
        self.held.clear()
        self.dev.empty_cache()


@pytest.fixture(
    params=[
        "sim",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu tests did not run"),
            ],
        ),
    ]
)
def card(request, tmp_path):
    impl = Sim(tmp_path) if request.param == "sim" else Cuda(tmp_path)
    old = device.install(impl.dev)
    try:
        yield impl
    finally:
        impl.close()
        device.install(old)


def test_reading_is_one_consistent_look(card) -> None:
    card.alloc("first", 0.01)  # the card is in use: this process has its CUDA context
    r = card.dev.reading()
    assert r.total > 0 and 0 <= r.free <= r.total
    card.alloc("a", 2)
    after = card.dev.reading()
    assert after.allocated >= r.allocated + 2 * card.unit
    assert after.reserved >= after.allocated
    # Our growth shows in the free figure every process sees, and is not counted as another program's.
    assert r.free - after.free >= 2 * card.unit - 64 * MiB
    assert abs(after.others - r.others) < 64 * MiB


def test_freed_blocks_stay_reserved_until_the_cache_is_emptied(card) -> None:
    h = card.alloc("a", 2)
    held = card.dev.reading()
    card.free(h)
    cached = card.dev.reading()
    assert cached.allocated <= held.allocated - 2 * card.unit
    assert cached.reserved == held.reserved  # the caching allocator keeps the blocks
    assert cached.free == held.free  # so no other process can use them
    card.dev.empty_cache()
    emptied = card.dev.reading()
    assert emptied.reserved <= cached.reserved - 2 * card.unit
    assert emptied.free >= cached.free + 2 * card.unit - 64 * MiB


def test_peak_and_its_reset(card) -> None:
    card.dev.reset_peak()
    base = card.dev.peak_reserved()
    h = card.alloc("a", 3)
    card.free(h)
    assert card.dev.peak_reserved() >= base + 3 * card.unit
    assert card.dev.peak_allocated() >= 3 * card.unit
    card.dev.empty_cache()
    card.dev.reset_peak()
    assert card.dev.peak_reserved() < base + 3 * card.unit


def test_more_than_the_card_raises_out_of_memory(card) -> None:
    r = card.dev.reading()
    with pytest.raises(torch.OutOfMemoryError) as err:
        card.alloc("huge", (r.total + GiB) / card.unit)
    assert "CUDA out of memory. Tried to allocate" in str(err.value)
    assert device.is_out_of_memory(err.value)


def test_out_of_memory_is_recognised_outside_the_caching_allocator() -> None:
    assert device.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert device.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not device.is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not device.is_out_of_memory(ValueError("out of memory"))


# -- the simulated card's own behaviour --------------------------------------------------------------------
def test_another_process_takes_memory_by_raising_its_entry(tmp_path) -> None:
    path = str(tmp_path / "card.json")
    dev = SimCard(path, total=20 * GiB)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from clair.device import simcard; print(simcard.take(sys.argv[2], 'other:1', 3 * 1024**3))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO), path], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
    assert dev.reading().free == 17 * GiB
    assert json.loads(Path(path).read_text())["procs"] == {"other:1": 3 * GiB}
    simcard.give_back(path, "other:1")
    assert dev.reading().free == 20 * GiB


def test_a_dead_process_memory_comes_back(tmp_path) -> None:
    path = str(tmp_path / "card.json")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert simcard.take(path, f"ollama:{proc.pid}:runner", 5 * GiB)
        assert simcard.free_of(simcard.read(path)) == 15 * GiB
    finally:
        proc.kill()
        proc.wait()
    assert simcard.free_of(simcard.read(path)) == 20 * GiB


def test_every_refusal_is_counted_in_the_file(tmp_path) -> None:
    path = str(tmp_path / "card.json")
    dev = SimCard(path, total=4 * GiB)
    dev.hold("w", GiB)
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError):
            dev.hold("big", 8 * GiB)
    assert simcard.read(path)["oom"] == 2
    assert not simcard.take(path, "other:1", 8 * GiB)  # another program that checks first is not a refusal
    assert simcard.read(path)["oom"] == 2


def test_allocator_releases_its_cache_before_it_gives_up(tmp_path) -> None:
    dev = SimCard(str(tmp_path / "card.json"), total=10 * GiB)
    with dev.transient(6 * GiB):
        pass
    assert dev.reserved() == 6 * GiB  # cached
    with dev.transient(8 * GiB):  # fits only once the 6 GiB cache is given back (as PyTorch's allocator does)
        assert dev.allocated() == 8 * GiB
    assert simcard.read(dev.path)["oom"] == 0


def test_first_use_outside_the_allocator_fails_as_a_plain_runtime_error(tmp_path) -> None:
    path = str(tmp_path / "card.json")
    dev = SimCard(path, total=20 * GiB)
    dev.hold("weights", 7 * GiB)
    assert simcard.take(path, "other:1", 12 * GiB)
    with pytest.raises(RuntimeError) as err, dev.transient(2 * GiB, first_use="cublas"):
        pass
    assert not isinstance(err.value, torch.OutOfMemoryError)
    assert "CUBLAS_STATUS_ALLOC_FAILED" in str(err.value)
    assert device.is_out_of_memory(err.value)
    simcard.give_back(path, "other:1")
    with dev.transient(2 * GiB, first_use="cublas"):
        pass
    assert simcard.read(path)["oom"] == 1


def test_weight_swap_moves_the_declared_bytes(tmp_path) -> None:
    dev = SimCard(str(tmp_path / "card.json"), total=20 * GiB)
    old = device.install(dev)
    try:
        m = torch.nn.Linear(4, 4)
        m.sim_bytes = 5 * GiB  # what the real module it stands for weighs
        swap = gpu.WeightSwap([m], "auto")
        assert swap.active and swap.nbytes == 5 * GiB
        swap.restore()
        assert dev.allocated() == 5 * GiB and m.weight.device.type == "cpu"  # the arithmetic stays on the CPU
        swap.evict()
        assert dev.allocated() == 0 and dev.reserved() == 0  # emptied: every process sees it free
        assert dev.reading().free == 20 * GiB - simcard.FIGURES["context"]  # the CUDA context stays
    finally:
        device.install(old)


def test_reading_never_invents_another_program_while_we_allocate(tmp_path) -> None:
    """Defect 10: free and our reserved read at different moments made our own growth look like another
    program's. One reading, under the card's lock, never does."""
    dev = SimCard(str(tmp_path / "card.json"), total=20 * GiB)
    dev.hold("weights", 6 * GiB)
    stop = threading.Event()

    def render() -> None:
        while not stop.is_set():
            with dev.transient(5 * GiB):
                pass
            dev.empty_cache()

    t = threading.Thread(target=render)
    t.start()
    try:
        seen = [dev.reading().others for _ in range(300)]
    finally:
        stop.set()
        t.join()
    context = simcard.FIGURES["context"]
    assert max(seen) == context  # only our own CUDA context, never a phantom program


def test_configure_from_settings(tmp_path) -> None:
    old = device.install(None)
    try:
        dev = simcard.configure(20, str(tmp_path / "card.json"))
        assert dev.present and isinstance(dev, SimCard) and dev.total == 20 * GiB
        assert simcard.configure(20, str(tmp_path / "card.json")) is dev  # one card per file and process
        assert gpu.budget_bytes(0, 1.5) == int(18.5 * GiB)
        if not torch.cuda.is_available():
            assert not simcard.configure(0, "").present
    finally:
        device.install(old)
    assert os.path.exists(tmp_path / "card.json")


# -- the simulated card as a state machine: its books always balance -------------------------------------

class SimCardMachine(RuleBasedStateMachine):
    """Holds, drops, activations, cache empties and another program's takes, in any order. After every step:
    reserved >= allocated, our file entry is our context plus our reserved pool, the card is never
    over-committed, and a refused allocation changes nothing but the refusal count."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = str(Path(self.dir.name) / "card.json")
        self.dev = SimCard(self.path, total=8 * GiB)
        self.held: dict[str, int] = {}
        self.other = 0
        self.refused = 0

    def teardown(self):
        self.dir.cleanup()

    sizes = st.integers(min_value=0, max_value=6 * 4).map(lambda q: q * GiB // 4)

    @rule(key=st.sampled_from("abc"), n=sizes)
    def hold(self, key, n):
        try:
            self.dev.hold(key, n)
            self.held[key] = n
        except (torch.OutOfMemoryError, RuntimeError):
            self.refused += 1

    @rule(key=st.sampled_from("abc"))
    def drop(self, key):
        self.dev.drop(key)
        self.held.pop(key, None)

    @rule(n=sizes, slack=sizes, first=st.booleans())
    def activations(self, n, slack, first):
        before = self.dev.allocated()
        try:
            with self.dev.transient(n, slack, first_use="cublas" if first else ""):
                assert self.dev.allocated() == before + n
        except (torch.OutOfMemoryError, RuntimeError):
            self.refused += 1
        assert self.dev.allocated() == before

    @rule()
    def empty(self):
        self.dev.empty_cache()
        assert self.dev.reserved() == self.dev.allocated()

    @rule(n=sizes)
    def other_program(self, n):
        if simcard.take(self.path, "other:1", n):
            self.other = n

    @invariant()
    def books_balance(self):
        state = simcard.read(self.path)
        assert self.dev.allocated() == sum(self.held.values())
        assert self.dev.reserved() >= self.dev.allocated()
        ours = state["procs"].get(self.dev.holder, 0)
        context = simcard.FIGURES["context"] if ours else 0
        assert ours == (context + self.dev.reserved() if (ours or self.dev.reserved()) else 0)
        assert state["procs"].get("other:1", 0) == self.other
        assert sum(state["procs"].values()) <= state["total"]  # never over-committed
        assert state["oom"] == self.refused


TestSimCardMachine = SimCardMachine.TestCase
TestSimCardMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
