"""Preemption's bounds (the arbiter's invariant 9), checked after every step of random runs.

A hypothesis state machine drives the real `Arbiter` (policy and shell) on a clock of its own: one render
steps through its denoising loop, asking `should_yield()` at every step boundary and pausing when told to,
while chats that cannot run beside it arrive and finish at random and the clock moves on. The checks are
written from the docstring's statement, not from the code: they keep their own record of every pause (when
it began, which chats waited then, which joined it) and of every chat.

* A pause serves the chats that wait when it begins and those that join it, and the render resumes only
  when none of them waits; at most `max_pause_chats` join, and none once the pause is `pause_join_s` old.
* The slice bounds how often, not how long: at a step boundary where a chat waits that cannot run beside
  the render, the render pauses unless a bound says no (pauses used up, paused `max_paused_s` in all, or
  the last pause began less than `render_slice_s` ago).
* A render never pauses more than `max_preemptions` times, nor in its tail.
* A render cannot starve (its total paused time is bounded): under `always`, where the chats could run beside
  it, no pause begins and no chat joins one once the render has been paused `max_pause_share` of its elapsed
  time, and a render paused past that resumes, beside its chats, at the next hand-over (a chat's arrival or
  end); chats that fit then share the GPU with it instead of pausing it.
"""

from __future__ import annotations

import time as real_time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import clair.arbiter.shell as arbiter_module
from clair.arbiter import Arbiter, GiB

STEPS = 12
STEP_S = 0.1
# (budget GiB, preempt, render need, render idle, chat need): in both, a chat cannot run beside the render.
CARDS = {
    "no-fit": (20, "auto", 16.4, 6.46, 5.7),
    "seed card, always": (20, "always", 11.6, 6.46, 6.05),
}


class Clock:
    """time.time() and time.monotonic() for the arbiter module, moved on by the machine only."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):  # anything else (sleep, perf_counter) is the real one
        return getattr(real_time, name)


class PauseMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self._real_time = arbiter_module.time
        arbiter_module.time = self.clock

    def teardown(self):
        arbiter_module.time = self._real_time

    @initialize(
        card=st.sampled_from(sorted(CARDS)),
        slice_s=st.sampled_from([0.0, 0.5, 3.0]),
        join_s=st.sampled_from([0.5, 3.0, 10.0]),
        max_chats=st.sampled_from([1, 2, 8]),
        max_pauses=st.sampled_from([1, 3, 5]),
        max_paused_s=st.sampled_from([2.0, 60.0]),
        share=st.sampled_from([0.2, 0.5, 1.0]),
    )
    def setup(self, card, slice_s, join_s, max_chats, max_pauses, max_paused_s, share):
        budget, preempt, self.need, idle, self.chat_need = CARDS[card]
        # The pause budget applies where a chat could run beside the render and `always` pauses it anyway.
        self.share = share if preempt == "always" and self.need + self.chat_need <= budget and share < 1 else None
        self.arb = Arbiter(
            policy="budget",
            budget_bytes=int(budget * GiB),
            preempt=preempt,
            render_slice_s=slice_s,
            max_preemptions=max_pauses,
            pause_join_s=join_s,
            max_pause_chats=max_chats,
            max_paused_s=max_paused_s,
            max_pause_share=share,
        )
        self.render = self.arb.request("render", "image", int(self.need * GiB), int(idle * GiB), label="render")
        assert self.render.poll(0)
        self.began = self.clock.now
        self.done = 0  # denoising steps done
        self.finished = False
        self.tail = False
        self.chats: list = []
        self.arrived: dict[int, float] = {}
        self.pauses: list[dict] = []  # start, waiting (chat ids at the start), joined (ids), resumed_at
        self.paused_total = 0.0
        self.last_pause_start: float | None = None

    # -- helpers ---------------------------------------------------------------------------------
    def waiting_chats(self):
        return [c for c in self.chats if c.released_at is None and c.granted_at is None]

    def running_chats(self):
        return [c for c in self.chats if c.released_at is None and c.granted_at is not None]

    def render_running(self):
        return not self.finished and self.render.req.id in self.arb._running

    def current_pause(self):
        return self.pauses[-1] if self.pauses and self.pauses[-1]["resumed_at"] is None else None

    def paused_now(self) -> float:
        pause = self.current_pause()
        return self.paused_total + (self.clock.now - pause["start"] if pause else 0.0)

    def budget_now(self) -> float:
        """The render's pause budget by the docstring: `max_pause_share` of its elapsed time."""
        return float("inf") if self.share is None else self.share * (self.clock.now - self.began)

    def spent(self) -> bool | None:
        """Is the pause budget spent? None on a tie (float rounding decides it; nothing is asserted)."""
        paused, budget = self.paused_now(), self.budget_now()
        return None if abs(paused - budget) < 1e-6 else paused > budget

    # -- rules -----------------------------------------------------------------------------------
    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, 4.0]))
    def tick(self, dt):
        self.clock.now += dt

    @rule()
    def chat_arrives(self):
        pause = self.current_pause()
        spent = self.spent()
        c = self.arb.request("chat", "ollama", int(self.chat_need * GiB), label="chat")
        self.chats.append(c)
        self.arrived[c.req.id] = self.clock.now
        c.poll(0)
        self._after_change(handover=True)  # a render paused past its budget resumes now
        if pause is not None and c.granted_at is not None and self.current_pause() is pause:
            pause["joined"].append(c.req.id)
            assert spent is not True, "a chat joined a pause past the render's pause budget"

    @precondition(lambda self: any(c.released_at is None for c in self.chats))
    @rule(i=st.integers(0, 50))
    def chat_finishes(self, i):
        live = [c for c in self.chats if c.released_at is None and c.granted_at is not None]
        if not live:
            return
        c = live[i % len(live)]
        c.poll(0)
        c.release()
        self._after_change(handover=True)

    @precondition(lambda self: not self.finished)
    @rule()
    def render_step(self):
        if not self.render_running():
            self._after_change()
            return
        self.render.poll(0)
        self.clock.now += STEP_S
        self.done += 1
        self.render.progress(self.done, STEPS)
        if self.done == STEPS:
            self.arb.shrink(self.render, int(4 * GiB))  # the tail: the decode only
            self.tail = True
            assert not self.arb.should_yield(self.render), "a render in its tail paused"
            self.render.release()
            self.finished = True
            self._after_change()
            return
        waiting = [c.req.id for c in self.waiting_chats()]
        reason = self.arb.should_yield(self.render)
        # The slice bounds how often, not how long: a waiting chat pauses the render unless a bound says no.
        since = None if self.last_pause_start is None else self.clock.now - self.last_pause_start
        spent = self.spent()
        bound = (
            self.render.pauses >= self.arb.max_preemptions
            or self.paused_total >= self.arb.max_paused_s
            or (since is not None and since < self.arb.render_slice_s)
            or spent is True  # the chats (which fit) now share the GPU with it
        )
        if waiting and not bound and spent is not None:
            assert reason, f"chats {waiting} wait and no bound applies, but the render carried on"
        if bound:
            assert not reason, "the render paused past one of its bounds"
        if reason:
            self.render = self.arb.pause(self.render, reason)
            self.last_pause_start = self.clock.now
            self.pauses.append({"start": self.clock.now, "waiting": waiting, "joined": [], "resumed_at": None})
            for c in self.chats:
                c.poll(0)
            self._after_change()

    def _after_change(self, handover: bool = False):
        """Record a resume when the continuation has been granted. `handover`: the arbiter has just planned
        again (a chat arrived or ended)."""
        pause = self.current_pause()
        if pause is None or self.finished:
            return
        if self.render.poll(0):
            pause["resumed_at"] = self.clock.now
            self.paused_total += self.clock.now - pause["start"]
            # The render resumes only when none of the pause's chats waits (or runs), or beside them once it
            # has been paused its budget.
            mine = set(pause["waiting"]) | set(pause["joined"])
            left = [c.req.id for c in self.chats if c.req.id in mine and c.released_at is None]
            assert not left or self.render.req.shares, f"the render resumed while chats of its pause were left: {left}"
        elif handover and self.spent() is True:
            raise AssertionError("a render paused past its pause budget did not resume at a hand-over")

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def pauses_are_bounded(self):
        if not hasattr(self, "arb"):
            return
        assert len(self.pauses) <= self.arb.max_preemptions
        assert self.render.pauses == len(self.pauses)

    @invariant()
    def a_pause_takes_in_at_most_its_bounds(self):
        if not hasattr(self, "arb"):
            return
        for p in self.pauses:
            assert len(p["joined"]) <= self.arb.max_pause_chats
            assert all(self.arrived[c] - p["start"] < self.arb.pause_join_s for c in p["joined"])

    @invariant()
    def a_chat_that_waits_does_so_for_a_reason(self):
        """Nothing idles: a chat waits only while the render holds the GPU or is queued ahead of it."""
        if not hasattr(self, "arb"):
            return
        if self.waiting_chats():
            assert self.render_running() or self.running_chats() or self.current_pause() is not None

    @invariant()
    def the_ledger_stays_within_the_budget(self):
        if not hasattr(self, "arb"):
            return
        assert self.arb.stats["budget_exceeded"] == 0


PauseMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPauseBounds = PauseMachine.TestCase
