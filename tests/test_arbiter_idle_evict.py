"""Arbiter.evict_idle_tenant (eject, the image keep-alive) and the estimates from measured progress.

An idle eviction takes no lease: it must never evict a tenant a request runs on or waits for, and a request
that arrives while it runs must wait until the memory is really free (invariant 4). Ordering is asserted
with events; the random test checks the invariant after every eviction under real threads.
"""

from __future__ import annotations

import random
import threading
import time

from clair.arbiter import Arbiter, GiB
from tests.test_arbiter_concurrency import FakeTenant


def make(**kw) -> Arbiter:
    a = Arbiter(**{"policy": "exclusive", "budget_bytes": 20 * GiB, "queue_timeout_s": 5, **kw})
    a.ollama = FakeTenant(a, "ollama")
    a.image = FakeTenant(a, "image")
    return a


def test_refuses_a_busy_or_awaited_tenant_and_one_used_too_recently():
    # Budget policy with chats alone on the GPU: a render waits for a chat with its weights still resident.
    a = make(policy="budget", preempt="always")
    lease = a.request("render", "image", 9 * GiB, 7 * GiB).wait(5)
    assert "busy" in a.evict_idle_tenant("image")
    lease.release()
    assert "less than" in a.evict_idle_tenant("image", idle_for_s=60)
    # A chat holds the GPU; a render waits behind it for the image tenant: the tenant is reserved.
    chat = a.request("chat", "ollama", 5 * GiB).wait(5)
    waiting = a.request("render", "image", 9 * GiB, 7 * GiB)
    assert not waiting.poll(0.05)
    assert "waiting for image" in a.evict_idle_tenant("image")
    chat.release()
    waiting.wait(5).release()
    assert a.image.evictions == 0
    assert a.evict_idle_tenant("image") == ""
    assert a.image.evictions == 1 and a.resident_bytes("image") == 0
    assert a.evict_idle_tenant("image") == ""  # not resident: nothing to do
    assert a.history()["idle_evictions"][-1]["tenant"] == "image"


def test_a_render_arriving_during_an_idle_eviction_waits_for_it():
    a = make()
    a.request("render", "image", 9 * GiB, 7 * GiB).wait(5).release()
    a.image.gate = threading.Event()
    t = threading.Thread(target=a.evict_idle_tenant, args=("image",))
    t.start()
    assert a.image.entered.wait(5)
    render = a.request("render", "image", 9 * GiB, 7 * GiB)
    assert not render.poll(0.1), "granted while its own weights were still leaving the GPU"
    assert "leaving" in a.status()["waiting"][0]["reason"]
    a.image.gate.set()
    t.join(5)
    render.wait(5).release()
    assert a.image.evictions == 1


def test_idle_evictions_never_hit_a_busy_tenant_under_random_load():
    a = Arbiter(policy="budget", budget_bytes=20 * GiB, queue_timeout_s=10)
    busy = {"ollama": 0, "image": 0}
    guard = threading.Lock()
    violations: list[str] = []
    stop = threading.Event()

    def evictor(name):
        def evict():
            with guard:
                if busy[name]:
                    violations.append(f"{name} evicted while a request ran on it")
            time.sleep(0.0005)

        return evict

    a.add_tenant("ollama", evictor("ollama"))
    a.add_tenant("image", evictor("image"))

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(15):
            kind = rng.choice(["chat", "render"])
            tenant = "ollama" if kind == "chat" else "image"
            with a.lease(kind, tenant, rng.choice([5, 9]) * GiB, idle=5 * GiB) as lease:
                with guard:
                    busy[tenant] += 1
                lease.progress(1, 2)
                time.sleep(rng.random() * 0.002)
                with guard:
                    busy[tenant] -= 1

    def ejector():
        rng = random.Random(99)
        while not stop.is_set():
            a.evict_idle_tenant(rng.choice(["ollama", "image"]), idle_for_s=rng.choice([0, 0.001]))

    ej = threading.Thread(target=ejector)
    ej.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stop.set()
    ej.join(10)
    assert not any(t.is_alive() for t in threads), "a worker deadlocked"
    assert violations == []
    st = a.status()
    assert st["holder"] is None and st["waiting"] == []
    assert not any(r["evicting"] for r in st["resident"])


def test_the_wait_behind_a_render_comes_from_its_measured_pace():
    a = make()
    render = a.request("render", "image", 9 * GiB, 7 * GiB, steps=20).wait(5)
    render.progress(0)  # the baseline (the first step)
    render._unit_at -= 5.0  # as if it was set 5 s ago: ten steps at 0.5 s each
    render.progress(10)
    assert abs(render.unit_s - 0.5) < 0.05
    chat = a.request("chat", "ollama", 5 * GiB)
    eta = chat.position()["eta_s"]
    assert 4.5 <= eta <= 5.5  # ten steps left at 0.5 s, not the 15 s default hold
    render.release()
    chat.wait(5).release()
