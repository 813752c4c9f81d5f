"""The arbiter's invariants (its module docstring), checked after every step of random runs.

A hypothesis state machine drives the real `Arbiter` (one thread: evictions run when a lease is polled)
through random arrivals of chats and renders of random sizes, grants whose evictions complete or fail,
releases and cancels, Ollama readings (sizes, "gone", stale ones) and failed readings, and memory held by
other programs coming and going. The checks below are written independently of the policy's code: they
recompute sizes and conflicts from the ledger instead of calling `_conflict`/`size`.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from clair.arbiter import Arbiter, GiB
from clair.errors import EvictionFailed

TENANTS = ("ollama", "local-chat", "image")


class ArbiterMachine(RuleBasedStateMachine):
    @initialize(
        policy=st.sampled_from(["budget", "exclusive"]),
        budget_gb=st.sampled_from([0, 12, 20, 24]),
        priority=st.sampled_from(["next", "fifo"]),
    )
    def setup(self, policy, budget_gb, priority):
        self.arb = Arbiter(policy=policy, budget_bytes=budget_gb * GiB, chat_priority=priority)
        self.fail_evict: set[str] = set()
        for name in TENANTS:
            self.arb.add_tenant(name, self._evictor(name))
        self.leases = []  # every lease ever requested
        self.granted_before: set[int] = set()
        self.evict_failed: list[str] = []

    def _evictor(self, name):
        def evict():
            if name in self.fail_evict:
                self.fail_evict.discard(name)
                raise EvictionFailed(f"{name} did not leave")

        return evict

    # -- helpers -------------------------------------------------------------------------------------
    def live(self):
        return [ls for ls in self.leases if ls.released_at is None]

    def running(self):
        return [ls for ls in self.leases if ls.released_at is None and ls.granted_at is not None]

    def waiting(self):
        return [ls for ls in self.leases if ls.released_at is None and ls.granted_at is None]

    def pick(self, leases, i):
        return leases[i % len(leases)] if leases else None

    def avail(self, residents):
        if self.arb.budget <= 0:
            return 0
        return max(1, self.arb.budget - sum(r.bytes for r in residents.values() if r.fixed))

    def size(self, req, residents):
        r = residents.get(req.tenant)
        return req.need if r is None else max(req.need, r.bytes, r.measured)

    def cannot_share(self, a, b, residents):
        """Independent of the policy's code: may a and b hold the GPU at the same time?"""
        if a.kind == "render" and b.kind == "render":
            return True
        if a.tenant == b.tenant:
            return False
        if self.arb.policy == "exclusive" or self.arb.budget <= 0:
            return True
        return self.size(a, residents) + self.size(b, residents) > self.avail(residents)

    # -- rules ---------------------------------------------------------------------------------------
    @rule(tenant=st.sampled_from(["ollama", "local-chat"]), need=st.integers(1, 14))
    def chat_arrives(self, tenant, need):
        self._arrive("chat", tenant, need * GiB, need * GiB)

    @rule(need=st.integers(4, 26), idle=st.integers(1, 8))
    def render_arrives(self, need, idle):
        self._arrive("render", "image", need * GiB, min(idle, need) * GiB)

    def _arrive(self, kind, tenant, need, idle):
        before = {ls.req.id for ls in self.running()}
        lease = self.arb.request(kind, tenant, need, idle)
        self.leases.append(lease)
        self._after_step(before)

    @precondition(lambda self: any(ls.ready_at is None for ls in self.running()))
    @rule(i=st.integers(0, 50), fail=st.sampled_from([None, *TENANTS]))
    def evictions_run(self, i, fail):
        """The grantee polls: its evictions run (one may fail: the lease is then released)."""
        lease = self.pick([ls for ls in self.running() if ls.ready_at is None], i)
        before = {ls.req.id for ls in self.running()}
        if fail is not None and fail in lease._grant.evict:
            self.fail_evict.add(fail)
        try:
            assert lease.poll(0)
        except EvictionFailed:
            assert lease.released_at is not None  # a failed eviction releases the lease (invariant 8)
            # Unknown is never empty (invariant 7): the tenant stays in the ledger (the next grant in line
            # may already be evicting it again: the ownership check below covers that).
            assert fail in self.arb._residents
        self.fail_evict.clear()
        self._after_step(before)

    @precondition(lambda self: bool(self.live()))
    @rule(i=st.integers(0, 50), twice=st.booleans())
    def release(self, i, twice):
        """A request ends (done, error, cancel, client gone), running or still waiting."""
        lease = self.pick(self.live(), i)
        before = {ls.req.id for ls in self.running()}
        lease.release()
        if twice:
            lease.release()  # idempotent (invariant 8)
        self._after_step(before)

    @rule(gb=st.integers(0, 16), stale=st.booleans())
    def ollama_reading(self, gb, stale):
        """A successful /api/ps reading (0: nothing loaded), possibly started before the last change."""
        before = {ls.req.id for ls in self.running()}
        read_at = 0.0 if stale else None
        self.arb.set_resident("ollama", gb * GiB, read_at=read_at)
        self._after_step(before)

    @rule(worst_gb=st.integers(1, 16))
    def ollama_reading_fails(self, worst_gb):
        before = {ls.req.id for ls in self.running()}
        self.arb.set_resident("ollama", worst_gb * GiB, at_least=True)
        # Invariant 7: after a failed reading Ollama is in the ledger, at least as large as the worst case.
        res = self.arb._residents.get("ollama")
        assert res is not None
        assert res.evicting or res.bytes >= worst_gb * GiB
        self._after_step(before)

    @rule(gb=st.integers(0, 8))
    def other_programs(self, gb):
        before = {ls.req.id for ls in self.running()}
        self.arb.set_other(gb * GiB)
        self._after_step(before)

    @precondition(lambda self: any(ls.kind == "render" for ls in self.waiting()))
    @rule()
    def no_new_arrivals_until_the_first_waiting_render_runs(self):
        """Starvation, bounded: with no new arrivals, the first waiting render is granted after at most as many
        releases as there were leases running or waiting ahead of it."""
        head = min((ls for ls in self.waiting() if ls.kind == "render"), key=lambda ls: ls.req.order)
        bound = len(self.running()) + sum(1 for w in self.waiting() if w.req.order < head.req.order)
        releases = 0
        while head.granted_at is None:
            before = {ls.req.id for ls in self.running()}
            for ls in [ls for ls in self.running() if ls.ready_at is None]:
                ls.poll(0)  # evictions complete (none fails here)
            self._after_step(before)
            if head.granted_at is not None:
                break
            residents = dict(self.arb._residents)
            in_way = [ls for ls in self.running() if self.cannot_share(head.req, ls.req, residents)]
            assert self.running(), "nothing runs, yet the render waits"
            victim = min(in_way or self.running(), key=lambda ls: ls.granted_at)
            before = {ls.req.id for ls in self.running()}
            victim.release()
            self._after_step(before)
            releases += 1
            assert releases <= bound, (releases, bound, head.req)

    # -- checks made with knowledge of the step ------------------------------------------------------
    def _after_step(self, before: set[int]):
        residents = dict(self.arb._residents)
        new = [ls for ls in self.running() if ls.req.id not in before and ls.req.id not in self.granted_before]
        self.granted_before |= {ls.req.id for ls in self.running()}
        if not new:
            return
        leaving = {name for ls in new for name in ls._grant.evict}
        staying = {n: r for n, r in residents.items() if n not in leaving}
        mine = [n for n, r in staying.items() if not r.fixed]
        # Invariant 3: every grant is planned within the budget, or leaves one of Clair's tenants alone.
        if self.arb.policy == "exclusive" or self.arb.budget <= 0:
            assert len(mine) <= 1, (mine, residents)
        elif len(mine) > 1:
            assert sum(r.bytes for r in staying.values()) <= self.arb.budget, residents
        # Invariant 5: nothing granted overtakes a waiting request it could not run beside.
        for g in new:
            for w in self.waiting():
                if w.req.order < g.req.order:
                    assert not self.cannot_share(w.req, g.req, residents), (w.req, g.req, residents)
            # ... and it fits beside everything else that runs.
            for other in self.running():
                if other is not g:
                    assert not self.cannot_share(g.req, other.req, residents), (g.req, other.req)
        # Invariant 4: only idle tenants are evicted.
        busy = {ls.req.tenant for ls in self.running() if ls not in new} | {g.req.tenant for g in new}
        assert not (leaving & busy), (leaving, busy)

    # -- invariants after every step -----------------------------------------------------------------
    @invariant()
    def one_render_at_a_time(self):
        if hasattr(self, "arb"):
            assert sum(1 for ls in self.running() if ls.kind == "render") <= 1  # invariant 2

    @invariant()
    def no_idling_hence_no_starvation(self):
        """Invariant 6: when nothing runs, nothing waits. With invariant 5 (checked at every grant), a
        waiting request is granted once the finitely many leases in its way have been released."""
        if hasattr(self, "arb") and not self.running():
            assert not self.waiting(), [ls.req for ls in self.waiting()]

    @invariant()
    def the_ledger_agrees_with_the_leases(self):
        if not hasattr(self, "arb"):
            return
        residents = self.arb._residents
        for ls in self.running():
            res = residents.get(ls.req.tenant)
            assert res is not None, ls.req  # a running request's tenant is in the ledger ...
            assert not res.evicting, ls.req  # ... and never on its way out (invariant 4)
            assert res.bytes >= ls.req.need
        evicting = {n for n, r in residents.items() if r.evicting}
        owners = {n for ls in self.running() if ls.ready_at is None for n in ls._grant.evict}
        assert evicting <= owners, (evicting, owners)  # an eviction always belongs to a live grant
        st_ = self.arb.status()
        assert len(st_["holders"]) == len(self.running()) and len(st_["waiting"]) == len(self.waiting())
        assert all(r["other"] == (r["tenant"] == "other") for r in st_["resident"])


ArbiterMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestArbiterInvariants = ArbiterMachine.TestCase
