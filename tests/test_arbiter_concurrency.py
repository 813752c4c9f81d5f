"""The arbiter's shell under real threads: ordering is asserted with events, never with sleeps."""

from __future__ import annotations

import random
import threading
import time

import pytest

from clair.arbiter import Arbiter, GiB
from clair.base.errors import Cancelled, EvictionFailed, GpuBusy

CHAT = 5 * GiB
RENDER = 16 * GiB


class FakeTenant:
    """Records evictions; can be made to block (until released) or fail."""

    def __init__(self, arbiter: Arbiter, name: str):
        self.name = name
        self.evictions = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail: Exception | None = None
        arbiter.add_tenant(name, self.evict)

    def evict(self):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5), "test never opened the eviction gate"
        if self.fail is not None:
            raise self.fail
        self.evictions += 1


@pytest.fixture
def arb():
    a = Arbiter(policy="exclusive", budget_bytes=20 * GiB, queue_timeout_s=5)
    a.ollama = FakeTenant(a, "ollama")
    a.image = FakeTenant(a, "image")
    return a


def test_a_render_waits_for_a_running_chat_then_evicts_the_chat_model(arb):
    chat = arb.request("chat", "ollama", CHAT).wait(1)
    render = arb.request("render", "image", RENDER)
    assert not render.poll(0.05)
    assert arb.status()["waiting"][0]["reason"] == "GPU busy: chat in progress"
    chat.release()
    assert render.poll(1)
    assert render.evicted == ("ollama",)
    assert arb.ollama.evictions == 1
    assert arb.status()["holder"]["kind"] == "render"
    render.release()
    assert arb.status()["holder"] is None


def test_chats_are_held_while_a_render_runs_and_all_go_after(arb):
    render = arb.request("render", "image", RENDER).wait(1)
    chats = [arb.request("chat", "ollama", CHAT, label=f"chat{i}") for i in range(3)]
    assert not any(c.poll(0.02) for c in chats)
    st = arb.status()
    assert [w["kind"] for w in st["waiting"]] == ["chat"] * 3
    assert all(w["eta_s"] > 0 for w in st["waiting"])
    render.release()
    for c in chats:
        assert c.poll(1)
    assert arb.image.evictions == 1  # the first chat moved the pipeline out; the others joined it
    assert {h["kind"] for h in arb.status()["holders"]} == {"chat"}
    for c in chats:
        c.release()


def test_a_waiting_render_stops_new_chats_from_joining(arb):
    arb.preempt = "off"  # with preemption, chats join for a slice first (tests/test_preempt.py)
    first = arb.request("chat", "ollama", CHAT).wait(1)
    render = arb.request("render", "image", RENDER)
    late_chat = arb.request("chat", "ollama", CHAT)
    assert not late_chat.poll(0.02)
    first.release()
    assert render.poll(1)
    assert not late_chat.poll(0.02)
    render.release()
    assert late_chat.poll(1)
    late_chat.release()


def test_next_priority_chat_goes_after_the_running_render_not_all_of_them(arb):
    r1 = arb.request("render", "image", RENDER).wait(1)
    r2 = arb.request("render", "image", RENDER)
    r3 = arb.request("render", "image", RENDER)
    chat = arb.request("chat", "ollama", CHAT)
    assert chat.position()["position"] == 1
    r1.release()
    assert chat.poll(1)
    assert not r2.poll(0.02)
    chat.release()
    assert r2.poll(1)
    r2.release()
    assert r3.poll(1)
    r3.release()


def test_fifo_priority_chat_waits_for_every_render_ahead():
    a = Arbiter(policy="exclusive", budget_bytes=20 * GiB, chat_priority="fifo")
    r1 = a.request("render", "image", RENDER).wait(1)
    r2 = a.request("render", "image", RENDER)
    chat = a.request("chat", "ollama", CHAT)
    assert chat.position()["position"] == 2
    r1.release()
    assert r2.poll(1)
    assert not chat.poll(0.02)
    r2.release()
    assert chat.poll(1)
    chat.release()


def test_an_exception_inside_the_lease_releases_the_gpu(arb):
    with pytest.raises(RuntimeError), arb.lease("render", "image", RENDER):
        raise RuntimeError("pipeline exploded")
    assert arb.status()["holder"] is None
    with arb.lease("chat", "ollama", CHAT) as lease:
        assert lease.ready_at is not None


def test_a_failed_eviction_refuses_the_request_releases_it_and_the_queue_moves_on(arb):
    arb.request("chat", "ollama", CHAT).wait(1).release()  # ollama now resident and idle
    arb.ollama.fail = EvictionFailed("Ollama still lists llama3.1:8b after 60 s")
    render = arb.request("render", "image", RENDER)
    with pytest.raises(EvictionFailed, match="still lists"):
        render.wait(1)
    assert render.released_at is not None
    st = arb.status()
    assert st["holder"] is None and st["waiting"] == []
    assert st["stats"]["evict_failures"] == 1
    # Next time Ollama behaves: the render gets the GPU after a real eviction.
    arb.ollama.fail = None
    with arb.lease("render", "image", RENDER) as lease:
        assert lease.evicted == ("ollama",)


def test_evictions_run_outside_the_lock(arb):
    arb.request("chat", "ollama", CHAT).wait(1).release()
    arb.ollama.gate = threading.Event()
    render = arb.request("render", "image", RENDER)
    t = threading.Thread(target=render.wait, args=(5,))
    t.start()
    assert arb.ollama.entered.wait(2)
    # The eviction is blocked; the arbiter still answers and still counts the leaving tenant.
    st = arb.status()
    assert st["holder"]["phase"] == "evicting"
    assert any(r["tenant"] == "ollama" and r["evicting"] for r in st["resident"])
    chat = arb.request("chat", "ollama", CHAT)
    assert not chat.poll(0.02)  # never on a tenant that is leaving, nor beside the render
    arb.ollama.gate.set()
    t.join(2)
    assert render.ready_at is not None and render.evict_s > 0
    render.release()
    assert chat.poll(1)
    chat.release()


def test_release_from_another_thread_and_twice_is_fine(arb):
    lease = arb.request("chat", "ollama", CHAT).wait(1)
    t = threading.Thread(target=lease.release)
    t.start()
    t.join(2)
    lease.release()
    assert arb.is_idle()


def test_queue_timeout_raises_gpu_busy_and_leaves_no_trace(arb):
    render = arb.request("render", "image", RENDER).wait(1)
    chat = arb.request("chat", "ollama", CHAT)
    with pytest.raises(GpuBusy, match="CLAIR_QUEUE_TIMEOUT_S"):
        chat.wait(0.05)
    assert arb.status()["waiting"] == []
    render.release()
    assert arb.is_idle()


def test_cancel_while_waiting_releases(arb):
    render = arb.request("render", "image", RENDER).wait(1)
    chat = arb.request("chat", "ollama", CHAT)
    with pytest.raises(Cancelled):
        chat.wait(5, cancelled=lambda: True)
    assert arb.status()["waiting"] == []
    render.release()


def test_wait_free_is_asked_for_what_the_request_still_needs():
    asked = []
    a = Arbiter(policy="exclusive", budget_bytes=20 * GiB, wait_free=asked.append)
    a.add_tenant("ollama", lambda: None)
    a.request("chat", "ollama", CHAT).wait(1).release()
    with a.lease("render", "image", RENDER, idle=7 * GiB):
        pass
    assert asked == [RENDER]  # the image pipeline was not resident: all of it must be free
    a.set_resident("ollama", CHAT)  # someone chatted with Ollama behind Clair's back
    with a.lease("render", "image", RENDER, idle=7 * GiB):
        pass
    assert asked[-1] == RENDER - 7 * GiB  # the pipeline's weights were still resident


def test_set_resident_tracks_reality_and_zero_forgets(arb):
    arb.set_resident("ollama", int(5.2 * GiB))
    assert arb.resident_bytes("ollama") == int(5.2 * GiB)
    arb.set_resident("ollama", 0)  # e.g. Ollama's keep_alive ran out
    assert arb.resident_bytes("ollama") == 0
    with arb.lease("render", "image", RENDER) as lease:
        assert lease.evicted == ()  # nothing to evict any more


@pytest.mark.parametrize("policy", ["exclusive", "budget"])
def test_invariants_hold_under_random_concurrent_load(policy):
    """Many threads, random chats and renders: no overlap the policy forbids, nothing lost, no deadlock."""
    a = Arbiter(policy=policy, budget_bytes=20 * GiB, queue_timeout_s=10)
    on_gpu: dict[str, int] = {"chat": 0, "render": 0}
    resident = {"ollama": False, "image": False}
    guard = threading.Lock()
    violations: list[str] = []
    done = []

    def evictor(name):
        def evict():
            with guard:
                resident[name] = False

        return evict

    a.add_tenant("ollama", evictor("ollama"))
    a.add_tenant("image", evictor("image"))

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(15):
            kind = rng.choice(["chat", "chat", "render"])
            tenant = "ollama" if kind == "chat" else "image"
            need = rng.choice([5, 9]) * GiB if kind == "chat" else rng.choice([9, 15]) * GiB
            with a.lease(kind, tenant, need, idle=min(need, 7 * GiB)):
                with guard:
                    on_gpu[kind] += 1
                    resident[tenant] = True
                    if on_gpu["render"] > 1:
                        violations.append("two renders at once")
                    if policy == "exclusive" and on_gpu["render"] and on_gpu["chat"]:
                        violations.append("chat and render at once under exclusive")
                time.sleep(rng.random() * 0.002)  # hold the lease a little, to interleave
                with guard:
                    on_gpu[kind] -= 1
        done.append(seed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(done) == 6, "a worker deadlocked or died"
    assert violations == []
    st = a.status()
    assert st["holder"] is None and st["waiting"] == []
    assert st["stats"]["budget_exceeded"] == 0


def test_a_lease_withdrawn_between_grant_and_poll_leaves_nothing_stuck(arb):
    """Client gone at the instant of the grant: the evictions it was granted never happen."""
    arb.set_resident("ollama", 5 * GiB)
    render = arb.request("render", "image", RENDER, 6 * GiB).wait(1)
    chat = arb.request("chat", "ollama", CHAT)
    waiting = chat.waiting(timeout=5)
    next(waiting)  # Studio.chat is suspended at `yield Waiting`
    render.release()  # the chat is granted, with the image pipeline to evict
    waiting.close()  # ... and the browser tab closes before it runs
    assert not any(r["evicting"] for r in arb.status()["resident"])
    with pytest.raises(Cancelled):
        chat.poll(0)  # a withdrawn lease never gets the GPU
    with arb.lease("render", "image", RENDER, 6 * GiB) as again:
        assert again.ready_at is not None
    assert arb.image.evictions == 0


def test_release_never_shrinks_a_tenant_below_what_it_reported():
    a = Arbiter(policy="budget", budget_bytes=int(22.5 * GiB))
    evicted = []
    a.add_tenant("ollama", lambda: evicted.append("ollama"))
    chat = a.request("chat", "ollama", int(5.7 * GiB)).wait(1)
    a.set_resident("ollama", 14 * GiB)  # /api/ps: two models loaded
    render = a.request("render", "image", int(16.4 * GiB), int(6.46 * GiB))
    chat.release()
    assert render.poll(1)
    assert evicted == ["ollama"]  # 14 + 16.4 does not fit in 22.5
    render.release()


def test_a_failed_eviction_leaves_no_phantom_tenant(arb):
    arb.set_resident("ollama", 5 * GiB)
    arb.ollama.fail = EvictionFailed("stuck")
    with pytest.raises(EvictionFailed):
        arb.request("render", "image", RENDER, 6 * GiB).wait(1)
    assert [(r["tenant"], r["evicting"]) for r in arb.status()["resident"]] == [("ollama", False)]


def test_a_stale_reading_does_not_overwrite_the_ledger(arb):
    read_at = time.monotonic()  # a /api/ps reading starts...
    arb.set_resident("ollama", 5 * GiB)
    with arb.lease("chat", "ollama", CHAT):
        pass  # ... a chat runs and is released meanwhile ...
    arb.set_resident("ollama", 0, read_at=read_at)  # ... and the old "nothing loaded" arrives late
    assert arb.resident_bytes("ollama") == 5 * GiB
    arb.set_resident("ollama", 0, read_at=time.monotonic())  # a fresh reading counts
    assert arb.resident_bytes("ollama") == 0
