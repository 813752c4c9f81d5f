"""The two arbiter hooks healing needs: `evict_idle()` (out-of-memory retries) and `stalled()` (the watchdog)."""

from __future__ import annotations

import time

from clair.arbiter import Arbiter
from clair.base.errors import EvictionFailed

GiB = 1024**3


def _arbiter(evicted: list[str], fail: set[str] = frozenset()) -> Arbiter:
    arb = Arbiter(policy="budget", budget_bytes=24 * GiB)
    for name in ("ollama", "image", "local-chat"):

        def evict(name=name):
            if name in fail:
                raise EvictionFailed(f"{name} would not leave")
            evicted.append(name)

        arb.add_tenant(name, evict)
    return arb


def test_evict_idle_evicts_every_idle_tenant_and_claims_the_budget() -> None:
    evicted: list[str] = []
    arb = _arbiter(evicted)
    arb.set_resident("ollama", 5 * GiB)
    chat = arb.request("chat", "local-chat", 1 * GiB).wait(5)  # busy: stays
    render = arb.request("render", "image", 10 * GiB).wait(5)  # fits beside both
    assert {r["tenant"] for r in arb.status()["resident"]} == {"ollama", "local-chat", "image"}
    assert render.progress_at is None

    assert arb.evict_idle(render) == ("ollama",)
    assert evicted == ["ollama"]
    assert {r["tenant"] for r in arb.status()["resident"]} == {"local-chat", "image"}
    assert render.progress_at is not None  # evicting counts as progress
    # Nothing new is planned beside the retry, even what would have fitted before.
    other = arb.request("chat", "ollama", 1 * GiB)
    assert not other.poll(0.05)
    chat.release()
    assert not other.poll(0.05)
    render.release()
    assert other.poll(1)
    other.release()
    assert arb.is_idle()


def test_a_failed_eviction_leaves_the_tenant_counted() -> None:
    evicted: list[str] = []
    arb = _arbiter(evicted, fail={"ollama"})
    arb.set_resident("ollama", 5 * GiB)
    render = arb.request("render", "image", 10 * GiB).wait(5)
    assert arb.evict_idle(render) == ()
    (ollama,) = [r for r in arb.status()["resident"] if r["tenant"] == "ollama"]
    assert not ollama["evicting"] and arb.status()["stats"]["evict_failures"] == 1
    render.release()
    assert arb.evict_idle(render) == ()  # a released lease evicts nothing


def test_stalled_reports_holders_without_progress() -> None:
    arb = _arbiter([])
    lease = arb.request("render", "image", 10 * GiB, label="render 64x64").wait(5)
    waiting = arb.request("render", "image", 10 * GiB, label="queued")  # waiting leases never count
    assert arb.stalled(0.2) == []
    time.sleep(0.3)
    (stall,) = arb.stalled(0.2)
    assert stall["label"] == "render 64x64" and stall["silent_s"] >= 0.2
    lease.progress()
    assert arb.stalled(0.2) == []
    lease.release()
    waiting.release()
    assert arb.stalled(0.0) == []
