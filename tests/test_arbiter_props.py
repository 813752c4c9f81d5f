"""The arbiter's invariants (its module docstring), checked after every step of random runs.

A hypothesis state machine drives the real `Arbiter` (one thread: evictions run when a lease is polled)
through random arrivals of chats and renders of random sizes, grants whose evictions complete or fail,
releases and cancels, renders that pause for chats and resume, idle evictions (eject, keep-alive) and
out-of-memory evictions, Ollama readings (sizes, "gone", stale ones) and failed readings, and memory held
by other programs coming and going. Things also happen *while* a tenant leaves the GPU (a request
arrives, a reading lands), inside its `evict()`. The checks below are written independently of the
policy's code: they recompute sizes and conflicts from the ledger instead of calling `_conflict`/`size`.

The runs are derandomized by default (the "ci" profile: the same examples on every run, so CI cannot pass
by luck); `HYPOTHESIS_PROFILE=explore` searches afresh with more examples. What a search found is kept
below as plain regression tests (`test_regression_*`), step by step.
"""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from clair.arbiter import Arbiter, GiB
from clair.base.errors import EvictionFailed

TENANTS = ("ollama", "local-chat", "image")
MODELS = ("llama", "qwen", "mistral")


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
        self.meanwhile: list = []  # what happens during the next evict() (a request arrives, a reading lands)
        self.ran_meanwhile = False
        self.resized_meanwhile = False
        self.read_started: float | None = None  # time.monotonic() when an Ollama reading began
        # Ollama's models that chats which started brought since the last reading taken while none ran:
        # Ollama keeps them all loaded, so the ledger must count them all until a reading says otherwise.
        self.brought: dict[str, int] = {}
        self.last_shown: dict[str, int] = {}  # the models the last fresh reading showed (a chat is sized with them)

    def _evictor(self, name):
        def evict():
            # The moment a tenant leaves: it is marked leaving, and no request runs on it (invariant 4).
            res = self.arb._residents.get(name)
            assert res is not None and res.evicting, (name, res)
            assert not [ls.req for ls in self.running() if ls.req.tenant == name], name
            while self.meanwhile:
                self.ran_meanwhile = True
                self.meanwhile.pop(0)()
                # Whatever arrived meanwhile did not start on the tenant that is leaving.
                assert not [ls.req for ls in self.running() if ls.req.tenant == name], name
                self.pending_evictions_against_every_live_grant()
            if name in self.fail_evict:
                self.fail_evict.discard(name)
                raise EvictionFailed(f"{name} did not leave")
            if name == "ollama":
                self.brought.clear()  # every model unloaded

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

    def size(self, req, residents, together=True):
        """`together=False`: a waiting request alone, as a plan sized it before requests of its tenant that
        waited with it were granted and brought their models."""
        r = residents.get(req.tenant)
        if r is None:
            return req.need
        if not together:
            return max(req.need, r.bytes, r.measured)
        models = dict(r.parts)
        for model, nbytes in req.parts:
            models[model] = max(models.get(model, 0), nbytes)
        together = sum(models.values()) if r.parts and req.parts else 0
        return max(req.need, r.bytes, r.measured, together)

    def note_brought(self):
        for ls in self.running():
            if ls.ready_at is not None:
                for model, nbytes in ls.req.parts:
                    self.brought[model] = max(self.brought.get(model, 0), nbytes)

    @staticmethod
    def rides_along(g, w, new):
        """Did `g` join a tenant that a request ahead of `w`, granted in the same step, holds at least as large?
        Then `g` costs `w` nothing (found by hypothesis: three chats arrived while Ollama was leaving; the third
        was granted on the small tenant it found, and the first, ahead of the waiting second, grew that tenant
        after it in the same step; the sizes seen after the step made the third look like an overtaker)."""
        return any(
            h is not g and h.req.tenant == g.req.tenant and h.req.order < w.req.order and h.req.need >= g.req.need
            for h in new
        )

    def cannot_share(self, a, b, residents, together=True):
        """Independent of the policy's code: may a and b hold the GPU at the same time?"""
        if a.kind == "render" and b.kind == "render":
            return True
        if a.tenant == b.tenant:
            return False
        if self.arb.policy == "exclusive" or self.arb.budget <= 0:
            return True
        return self.size(a, residents, together) + self.size(b, residents, together) > self.avail(residents)

    # -- rules ---------------------------------------------------------------------------------------
    @rule(
        tenant=st.sampled_from(["ollama", "local-chat"]),
        need=st.integers(1, 14),
        model=st.sampled_from(MODELS),
    )
    def chat_arrives(self, tenant, need, model="llama"):
        """A chat; Ollama's name the model (Req.parts, Req.brings), sized as Clair would: the models the last
        reading showed, and its own, side by side."""
        if tenant != "ollama":
            return self._arrive("chat", tenant, need * GiB, need * GiB)
        parts = dict(self.last_shown)
        parts[model] = max(parts.get(model, 0), need * GiB)
        total = sum(parts.values())
        self._arrive("chat", tenant, total, total, tuple(sorted(parts.items())), brings=model)

    @rule(need=st.integers(4, 26), idle=st.integers(1, 8))
    def render_arrives(self, need, idle):
        self._arrive("render", "image", need * GiB, min(idle, need) * GiB)

    def _arrive(self, kind, tenant, need, idle, parts=(), brings=""):
        before = {ls.req.id for ls in self.running()}
        lease = self.arb.request(kind, tenant, need, idle, parts=parts, brings=brings)
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
        self.note_brought()
        lease.release()
        if twice:
            lease.release()  # idempotent (invariant 8)
        self._after_step(before)

    @rule()
    def ollama_reading_starts(self):
        """A reading of /api/ps begins (outside the lock); it lands in `ollama_reading(..., started=True)`."""
        self.read_started = time.monotonic()

    @rule(gb=st.integers(0, 16), started=st.booleans(), shows=st.none() | st.sets(st.sampled_from(MODELS)))
    def ollama_reading(self, gb, started, shows=None):
        """A successful /api/ps reading (0: nothing loaded); `started`: it began at the last
        `ollama_reading_starts`, and is stale if the tenant was granted, released or evicted since. `shows`: the
        models it lists (None: a reading without them), sharing `gb`."""
        before = {ls.req.id for ls in self.running()}
        read_at = self.read_started if started else None
        old = self.arb._residents.get("ollama")
        stale = read_at is not None and self.changed_since("ollama", read_at)
        exceeded = self.arb.stats["budget_exceeded"]
        self.note_brought()
        mine = [ls for ls in self.running() if ls.req.tenant == "ollama"]
        busy = bool(mine)
        parts = None
        if shows is not None:
            shown = sorted(shows) if gb else []
            parts = [(m, gb * GiB // len(shown)) for m in shown]
        self.arb.set_resident("ollama", gb * GiB, read_at=read_at, parts=parts)
        new = self.arb._residents.get("ollama")
        fresh = not stale and not (old is not None and old.evicting)
        if fresh and not busy:
            self.brought.clear()  # a reading while no chat ran: the truth about what Ollama holds
        if fresh and busy and parts is not None and old is not None and old.parts:
            # Only a chat loads a model: one the reading does not list and no running chat brings has left.
            bringing = {ls.req.brings for ls in mine}
            listed = {m for m, _ in parts}  # what the reading lists (nothing when it says 0 GiB)
            self.brought = {m: b for m, b in self.brought.items() if m in listed or m in bringing}
            assert new.bytes >= gb * GiB
            # (the reading may have shrunk the ledger enough for waiting chats to be granted: every part they were
            # sized with counts too, until the next reading)
            granted = [ls for ls in self.running() if ls.req.tenant == "ollama" and ls not in mine]
            bringing |= {m for ls in granted for m, _ in ls.req.parts}
            assert {m for m, _ in new.parts} <= listed | bringing, (new.parts, listed, bringing)
        if fresh and parts is not None:
            self.last_shown = dict(parts)
        if stale:
            assert new == old, (old, new)  # a stale reading is dropped: the ledger is as it was
        elif new != old:
            # Invariant 3's count: a reading that puts two or more of Clair's tenants over the budget is counted.
            residents = self.arb._residents
            mine = [r for r in residents.values() if not r.fixed and r.bytes]
            used = sum(r.bytes for r in residents.values())
            if self.arb.budget > 0 and len(mine) > 1 and used > self.arb.budget:
                assert self.arb.stats["budget_exceeded"] > exceeded, (residents, self.arb.budget)
        self._after_step(before)

    def changed_since(self, tenant: str, t: float) -> bool:
        """Was `tenant` granted, released or evicted after `t` (the shell's record of it)?"""
        return t < self.arb._changed.get(tenant, 0.0)

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

    @precondition(lambda self: any(ls.kind == "render" and ls.ready_at is not None for ls in self.running()))
    @rule(ask=st.booleans())
    def render_pauses(self, ask):
        """A running render pauses at a step boundary: when `should_yield` says so, or (forced) whenever."""
        lease = next(ls for ls in self.running() if ls.kind == "render" and ls.ready_at is not None)
        why = self.arb.should_yield(lease) if ask else "forced"
        if not why:
            return
        before = {ls.req.id for ls in self.running()}
        nxt = self.arb.pause(lease, why)
        self.leases.append(nxt)
        assert lease.released_at is not None and nxt.paused and nxt.pauses == lease.pauses + 1
        # A paused render holds no lease: its tenant counts at its idle size, not its need (invariant 9).
        res = self.arb._residents.get("image")
        if res is not None and not res.evicting and nxt.granted_at is None:
            assert res.bytes == max(lease.req.idle, res.measured), (res, lease.req)
        self._after_step(before)

    @precondition(lambda self: any(ls.paused and ls.ready_at is None for ls in self.running()))
    @rule(fail=st.sampled_from([None, *TENANTS]))
    def paused_render_resumes(self, fail):
        """A granted continuation runs its evictions (what the chats it paused for left behind) and resumes."""
        lease = next(ls for ls in self.running() if ls.paused and ls.ready_at is None)
        before = {ls.req.id for ls in self.running()}
        if fail is not None and fail in lease._grant.evict:
            self.fail_evict.add(fail)
        try:
            assert lease.poll(0)
            assert self.arb._residents["image"].bytes >= lease.req.need
        except EvictionFailed:
            assert lease.released_at is not None
        self.fail_evict.clear()
        self._after_step(before)

    @rule(tenant=st.sampled_from(TENANTS), fail=st.booleans(), idle_for=st.sampled_from([0.0, 3600.0]))
    def idle_eviction(self, tenant, fail, idle_for):
        """Eject, or the image keep-alive: an idle tenant leaves without a lease (Arbiter.evict_idle_tenant)."""
        before = {ls.req.id for ls in self.running()}
        was = self.arb._residents.get(tenant)
        busy = any(ls.req.tenant == tenant for ls in self.running())
        awaited = any(ls.req.tenant == tenant for ls in self.waiting())
        recent = idle_for and self.changed_since(tenant, time.monotonic() - idle_for)  # used within idle_for
        if fail:
            self.fail_evict.add(tenant)
        self.ran_meanwhile = False
        why = self.arb.evict_idle_tenant(tenant, idle_for_s=idle_for, why="test")
        self.fail_evict.discard(tenant)
        now = self.arb._residents.get(tenant)
        if was is None:
            assert why == ""
        elif busy or awaited or was.evicting or recent:
            assert why and now is not None, (why, was, now)  # refused: it stays, untouched
        elif fail:
            assert why and now is not None  # unknown is never empty (invariant 7) ...
            # ... and it is no longer leaving, unless a grant that arrived meanwhile is evicting it again.
            assert not now.evicting or any(tenant in ls._grant.evict for ls in self.running() if ls.ready_at is None)
        else:
            assert why == "", why
            assert now is None or self.ran_meanwhile, now
        self._after_step(before)

    @precondition(lambda self: any(ls.ready_at is not None for ls in self.running()))
    @rule(i=st.integers(0, 50), fail=st.sampled_from([None, *TENANTS]))
    def out_of_memory(self, i, fail):
        """A running request ran out of memory: every idle tenant leaves, nobody new joins it (evict_idle)."""
        lease = self.pick([ls for ls in self.running() if ls.ready_at is not None], i)
        before = {ls.req.id for ls in self.running()}
        busy = {ls.req.tenant for ls in self.running()}
        idle = {n for n, r in self.arb._residents.items() if not r.fixed and n not in busy and not r.evicting}
        fixed = {n: r for n, r in self.arb._residents.items() if r.fixed}
        if fail is not None:
            self.fail_evict.add(fail)
        self.ran_meanwhile = False
        gone = set(self.arb.evict_idle(lease))
        self.fail_evict.clear()
        assert gone == idle - {fail}, (gone, idle, fail)  # only idle ones; never a busy one
        assert {n: r for n, r in self.arb._residents.items() if r.fixed} == fixed  # others' memory stays
        if not self.ran_meanwhile:
            assert not gone & set(self.arb._residents)
        if self.arb.budget > 0:
            assert lease.req.need >= self.arb.budget  # nothing is planned beside it any more
        self._after_step(before)

    @rule(tenant=st.sampled_from(["ollama", "local-chat"]), need=st.integers(1, 14), reading=st.booleans())
    def something_happens_during_the_next_eviction(self, tenant, need, reading):
        """While the next tenant leaves (inside its evict()): a chat arrives, or an Ollama reading lands."""
        if reading:

            def land():
                if not any(ls.req.tenant == "ollama" for ls in self.running()):
                    self.brought.clear()  # a reading while no chat ran: the truth about what Ollama holds
                self.arb.set_resident("ollama", need * GiB, read_at=time.monotonic())
                self.resized_meanwhile = True  # sizes changed after this step's grants were planned

            self.meanwhile.append(land)
        else:
            self.meanwhile.append(lambda: self.leases.append(self.arb.request("chat", tenant, need * GiB, need * GiB)))

    @precondition(lambda self: any(ls.kind == "render" for ls in self.waiting()))
    @rule()
    def no_new_arrivals_until_the_first_waiting_render_runs(self):
        """Starvation, bounded: with no new arrivals, the first waiting render is granted after at most as many
        releases as there were leases running or waiting ahead of it."""
        self.meanwhile.clear()  # no new arrivals, not even inside an eviction
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
        resized, self.resized_meanwhile = self.resized_meanwhile, False
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
        elif len(mine) > 1 and not resized:  # (a reading that landed after the grant is counted, not planned)
            assert sum(r.bytes for r in staying.values()) <= self.arb.budget, residents
        # Invariant 5: nothing granted overtakes a waiting request it could not run beside.
        for g in new:
            for w in self.waiting():
                if w.req.order < g.req.order and not self.rides_along(g, w, new):
                    assert not self.cannot_share(w.req, g.req, residents, together=False), (w.req, g.req, residents)
            # ... and it fits beside everything else that runs (as planned: a reading may land after it).
            for other in self.running():
                if other is not g and not resized:
                    assert not self.cannot_share(g.req, other.req, residents), (g.req, other.req)
        # Invariant 4: only idle tenants are evicted.
        busy = {ls.req.tenant for ls in self.running() if ls not in new} | {g.req.tenant for g in new}
        assert not (leaving & busy), (leaving, busy)

    # -- invariants after every step -----------------------------------------------------------------
    @invariant()
    def pending_evictions_against_every_live_grant(self):
        """Invariant 4: no running request, whenever it was granted, uses a tenant that a live grant is still
        evicting (never start on a leaving tenant)."""
        if not hasattr(self, "arb"):
            return
        for owner in self.running():
            if owner.ready_at is not None:
                continue
            for name in owner._grant.evict:
                users = [ls.req for ls in self.running() if ls is not owner and ls.req.tenant == name]
                assert not users, (name, owner.req, users)

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
    def every_model_a_chat_brought_is_counted(self):
        """Ollama keeps every model a chat loaded, next to each other: the ledger counts all of them until a
        reading taken while no chat ran says what is left (else a render is granted into Ollama's memory)."""
        if not hasattr(self, "arb"):
            return
        self.note_brought()
        res = self.arb._residents.get("ollama")
        if self.brought and res is not None and not res.evicting:
            assert res.bytes >= sum(self.brought.values()), (res, self.brought)

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


# "ci" (the default): derandomized, so every run checks the same examples and a pass is not luck;
# "explore": a fresh random search, longer (HYPOTHESIS_PROFILE=explore python -m pytest tests/test_arbiter_props.py).
settings.register_profile(
    "ci", max_examples=1000, stateful_step_count=50, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", max_examples=2000, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
ArbiterMachine.TestCase.settings = settings.get_profile(PROFILE if PROFILE in ("ci", "explore") else "ci")
TestArbiterInvariants = ArbiterMachine.TestCase


# -- what searches found, kept as fixed cases (hypothesis prints a failing run as these steps) -----------------


def run_steps(steps) -> None:
    """Drive the machine through `steps` (name, kwargs), checking every invariant after each, as hypothesis does."""
    m = ArbiterMachine()
    checks = [
        m.one_render_at_a_time,
        m.no_idling_hence_no_starvation,
        m.pending_evictions_against_every_live_grant,
        m.the_ledger_agrees_with_the_leases,
        m.every_model_a_chat_brought_is_counted,
    ]
    for name, kwargs in steps:
        getattr(m, name)(**kwargs)
        for check in checks:
            check()
    m.teardown()


def test_regression_a_chat_never_starts_on_a_tenant_a_render_is_evicting():
    """The render evicts the least recently used chat model only (the rest fits); a chat for that model then
    fits beside the render by size, but its model is on its way out: it waits ("still leaving the GPU")."""
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 20, "priority": "next"}),
        ("chat_arrives", {"tenant": "local-chat", "need": 6}),
        ("evictions_run", {"i": 0, "fail": None}),  # it starts (its model is loaded) ...
        ("release", {"i": 0, "twice": False}),  # ... and ends: local-chat idle, 6 GiB
        ("chat_arrives", {"tenant": "ollama", "need": 6}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("release", {"i": 0, "twice": False}),  # ollama idle, 6 GiB, used more recently
        ("render_arrives", {"need": 12, "idle": 4}),  # granted; local-chat must leave first
        ("chat_arrives", {"tenant": "local-chat", "need": 1}),
        ("evictions_run", {"i": 0, "fail": None}),
    ])


def test_regression_a_chat_arriving_inside_the_eviction_waits_for_it():
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 20, "priority": "next"}),
        ("chat_arrives", {"tenant": "local-chat", "need": 6}),
        ("evictions_run", {"i": 0, "fail": None}),  # it starts (its model is loaded) ...
        ("release", {"i": 0, "twice": False}),  # ... and ends: local-chat idle, 6 GiB
        ("chat_arrives", {"tenant": "ollama", "need": 6}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("release", {"i": 0, "twice": False}),  # ollama idle, 6 GiB, used more recently
        ("render_arrives", {"need": 12, "idle": 4}),
        ("something_happens_during_the_next_eviction", {"tenant": "local-chat", "need": 1, "reading": False}),
        ("evictions_run", {"i": 0, "fail": None}),
    ])


def test_regression_a_reading_started_before_a_release_is_dropped():
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 24, "priority": "next"}),
        ("chat_arrives", {"tenant": "ollama", "need": 4}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("ollama_reading_starts", {}),
        ("release", {"i": 0, "twice": False}),
        ("ollama_reading", {"gb": 0, "started": True}),  # "nothing loaded", read before the release: stale
    ])


def test_regression_out_of_memory_keeps_other_programs_memory_in_the_ledger():
    """Found by the search: the out-of-memory eviction took memory held by other programs (a fixed
    tenant) out of the ledger, as if Clair could free it."""
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 0, "priority": "next"}),
        ("render_arrives", {"need": 4, "idle": 1}),
        ("other_programs", {"gb": 1}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("out_of_memory", {"i": 0, "fail": None}),
    ])


def test_regression_out_of_memory_counts_the_holder_at_its_new_need():
    """Found by the search: after an out-of-memory eviction the lease's need was the whole budget, but the
    ledger still counted its tenant at the old size."""
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 12, "priority": "next"}),
        ("render_arrives", {"need": 4, "idle": 1}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("out_of_memory", {"i": 0, "fail": None}),
    ])


def test_a_reading_larger_than_the_plan_moves_budget_exceeded():
    """Invariant 3: a tenant measured larger than planned is counted once it puts the ledger over the budget,
    and every later plan uses the larger size; a failed reading's worst case is not counted."""
    arb = Arbiter(budget_bytes=12 * GiB)
    arb.request("render", "image", 6 * GiB, 4 * GiB).wait().release()  # image idle at 4 GiB
    chat = arb.request("chat", "ollama", 4 * GiB).wait()  # 4 + 4 fits in 12
    assert arb.stats["budget_exceeded"] == 0
    arb.set_resident("ollama", 6 * GiB, at_least=True)  # a failed reading: assumed, not measured
    assert arb.stats["budget_exceeded"] == 0
    arb.set_resident("ollama", 10 * GiB)  # measured: 4 + 10 > 12
    assert arb.stats["budget_exceeded"] == 1
    chat.release()
    late = arb.request("chat", "ollama", 4 * GiB)
    assert late.poll(0) and late._grant.evict == ("image",)  # planned at the measured 10 GiB: image leaves
    late.release()


def test_regression_two_chats_for_different_models_are_both_counted_after_they_end():
    """The soak on the simulated card: two chats for different Ollama models, each sized before the other's
    model loaded, ran together; when the second ended the ledger fell to its model alone, and a render was
    granted into the memory of the first model, which Ollama still held: the card said out of memory."""
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 20, "priority": "next"}),
        ("chat_arrives", {"tenant": "ollama", "need": 6, "model": "llama"}),
        ("chat_arrives", {"tenant": "ollama", "need": 2, "model": "qwen"}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("release", {"i": 0, "twice": False}),
        ("release", {"i": 0, "twice": False}),  # the ledger holds both models (8 GiB), not qwen's 2
        ("render_arrives", {"need": 13, "idle": 6}),  # so the render evicts Ollama first
    ])


def test_a_render_after_two_models_evicts_ollama():
    from clair.arbiter import Arbiter

    arb = Arbiter(policy="budget", budget_bytes=20 * GiB)
    evicted = []
    for name in ("ollama", "image"):
        arb.add_tenant(name, lambda name=name: evicted.append(name))
    llama = arb.request("chat", "ollama", 6 * GiB, 6 * GiB, parts=[("llama", 6 * GiB)])
    qwen = arb.request("chat", "ollama", 2 * GiB, 2 * GiB, parts=[("qwen", 2 * GiB)])
    llama.wait(5), qwen.wait(5)
    assert arb.resident_bytes("ollama") == 8 * GiB  # both models, side by side
    llama.release()
    qwen.release()
    assert arb.resident_bytes("ollama") == 8 * GiB  # ... until a reading says what is left
    render = arb.request("render", "image", 13 * GiB, 6 * GiB).wait(5)
    assert evicted == ["ollama"]
    render.release()
    # A reading taken while no chat runs is the truth, and forgets the parts.
    arb.request("chat", "ollama", 2 * GiB, 2 * GiB, parts=[("qwen", 2 * GiB)]).wait(5).release()
    arb.set_resident("ollama", 2 * GiB)
    assert arb.resident_bytes("ollama") == 2 * GiB


def test_a_model_ollama_let_go_leaves_the_ledger_while_other_chats_still_run():
    """Chats for different models that keep overlapping (several users, several models) never leave Ollama
    idle: a reading taken while one runs used to only raise the ledger, so every model any chat ever brought
    stayed counted, and renders evicted or waited for memory nobody held. A reading by model now takes out a
    model it no longer lists, unless a running chat brings it (still loading)."""
    from clair.arbiter import Arbiter

    arb = Arbiter(policy="budget", budget_bytes=20 * GiB)
    evicted = []
    for name in ("ollama", "image"):
        arb.add_tenant(name, lambda name=name: evicted.append(name))
    image = arb.request("render", "image", 8 * GiB, 6 * GiB).wait(5)
    image.release()  # the image model stays, 6 GiB
    llama = arb.request("chat", "ollama", 6 * GiB, 6 * GiB, parts=[("llama", 6 * GiB)], brings="llama").wait(5)
    qwen = arb.request(
        "chat", "ollama", 8 * GiB, 8 * GiB, parts=[("llama", 6 * GiB), ("qwen", 2 * GiB)], brings="qwen"
    ).wait(5)
    assert arb.resident_bytes("ollama") == 8 * GiB
    # qwen is still loading: a reading lists nothing but llama, and qwen's chat keeps its model counted.
    arb.set_resident("ollama", 6 * GiB, parts=[("llama", 6 * GiB)])
    assert arb.resident_bytes("ollama") == 8 * GiB
    llama.release()
    # Ollama unloaded llama (one model at a time, OLLAMA_MAX_LOADED_MODELS=1) to load qwen; qwen's chat runs on.
    arb.set_resident("ollama", 2 * GiB, parts=[("qwen", 2 * GiB)])
    assert arb.resident_bytes("ollama") == 2 * GiB
    assert qwen.req.need == 2 * GiB and dict(qwen.req.parts) == {"qwen": 2 * GiB}
    # A render that needs 17 GiB now fits beside qwen's 2: neither the image model nor Ollama is evicted
    # for llama's 6 GiB that Ollama let go.
    render = arb.request("render", "image", 17 * GiB, 6 * GiB)
    assert render.poll(0) and render._grant.evict == ()
    render.release()
    # A model a reading shows larger than planned raises the ledger, as before.
    arb.set_resident("ollama", 3 * GiB, parts=[("qwen", 3 * GiB)])
    assert arb.resident_bytes("ollama") == 3 * GiB
    qwen.release()
    assert evicted == []


def test_regression_a_reading_by_model_while_chats_run_keeps_the_models_they_bring():
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 20, "priority": "next"}),
        ("chat_arrives", {"tenant": "ollama", "need": 6, "model": "llama"}),
        ("evictions_run", {"i": 0, "fail": None}),
        ("ollama_reading", {"gb": 6, "started": False, "shows": {"llama"}}),
        ("chat_arrives", {"tenant": "ollama", "need": 2, "model": "qwen"}),  # sized with llama beside it
        ("evictions_run", {"i": 0, "fail": None}),
        ("release", {"i": 0, "twice": False}),  # llama's chat ends; qwen's runs
        ("ollama_reading", {"gb": 2, "started": False, "shows": {"qwen"}}),  # Ollama let llama go
        ("render_arrives", {"need": 17, "idle": 6}),  # fits beside qwen's 2 GiB
    ])


def test_regression_a_reading_of_nothing_while_a_chat_runs_keeps_only_what_it_brings():
    """Found by CI's run of the machine: a reading listing nothing (0 GiB) while a chat ran that had been sized with
    a model the previous reading showed; the machine kept that model as brought, the ledger (rightly) did not."""
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 0, "priority": "next"}),
        ("ollama_reading", {"gb": 1, "shows": {"llama"}, "started": False}),
        ("chat_arrives", {"model": "qwen", "need": 1, "tenant": "ollama"}),
        ("evictions_run", {"fail": None, "i": 0}),
        ("ollama_reading", {"gb": 0, "shows": {"llama"}, "started": False}),
    ])


def test_regression_a_chat_the_reading_lets_in_brings_every_part_it_was_sized_with():
    """Found by the machine: a reading by model shrank the ledger while one chat ran, a waiting chat was granted in
    the same step, and the part it had been sized with (a model the reading no longer lists) came in with it. That
    is the ledger erring on the safe side until the next reading; the machine had expected only its own model."""
    run_steps([
        ("setup", {"policy": "budget", "budget_gb": 12, "priority": "next"}),
        ("ollama_reading", {"gb": 1, "shows": {"llama", "qwen"}, "started": False}),
        ("chat_arrives", {"model": "llama", "need": 1, "tenant": "ollama"}),
        ("ollama_reading", {"gb": 12, "shows": None, "started": False}),
        ("evictions_run", {"fail": None, "i": 0}),
        ("chat_arrives", {"model": "llama", "need": 1, "tenant": "local-chat"}),
        ("chat_arrives", {"model": "llama", "need": 1, "tenant": "ollama"}),
        ("ollama_reading", {"gb": 0, "shows": set(), "started": False}),
    ])
