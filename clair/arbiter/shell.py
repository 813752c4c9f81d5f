"""The arbiter's shell: the state under one lock, the policy applied to it, evictions run outside the
lock (clair/arbiter/__init__.py has the invariants)."""


from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from clair.arbiter.policy import (
    GiB,
    Grant,
    Kind,
    Policy,
    Preempt,
    Req,
    Resident,
    Snapshot,
    _conflict,
    apply_grant,
    available,
    blocked_reason,
    joins_pause,
    merge_parts,
    parts_bytes,
    pause_budget,
    plan,
    should_yield,
)
from clair.base.errors import Cancelled, EvictionFailed, GpuBusy

log = logging.getLogger("clair.arbiter")


# --------------------------------------------------------------------------------------------------
# The shell: state, lock, evictions.
# --------------------------------------------------------------------------------------------------


@dataclass
class Tenant:
    name: str
    evict: Callable[[], None]  # blocks until the tenant's GPU memory is free again


@dataclass
class Lease:
    """One request's claim on the GPU. Use as a context manager, or call `release()` in `finally`."""

    arbiter: Arbiter
    req: Req
    label: str
    requested_at: float  # time.time() at request
    granted_at: float | None = None  # time.time() when the policy granted it
    ready_at: float | None = None  # time.time() when its evictions were done: GPU work may start
    released_at: float | None = None
    evicted: tuple[str, ...] = ()
    evict_reason: str = ""
    pauses: int = 0  # how many times this render has paused for a chat (a continuation carries the count)
    paused: bool = False  # this lease continues a render that paused (see Arbiter.pause)
    paused_s: float = 0.0  # how long the render was paused before this lease (its pauses so far, in all)
    joined: int = 0  # chats that joined this continuation's pause after it began (see joins_pause)
    began_at: float | None = None  # a render's first grant (time.time()), carried by its continuations
    _grant: Grant | None = None
    _tenant_was_resident: bool = False
    progress_at: float | None = None  # time.monotonic() of the holder's last sign of life (see progress())
    _own_bytes: int = 0  # what its tenant held on the GPU when it was granted
    _tenant_grants: int = 0  # grants of its tenant so far, its own included (see Arbiter._release_locked)
    # Measured progress (written by the holder only, see progress()): steps or tokens done, a render's total
    # steps (known at request), and the measured seconds per step or per token (0 until measured).
    done: int = 0
    total: int = 0
    unit_s: float = 0.0
    _unit_at: float | None = None
    _unit_done: int = 0
    first_at: float | None = None  # time.monotonic() of the first step or token
    owner: str | None = None  # the user it is for (None without accounts), for the panel
    # Event-loop waiters (see waiting_async): (loop, future) pairs the shell completes, under its lock, when
    # the lease is granted or withdrawn. A waiter costs a future, not a thread.
    _futures: list = field(default_factory=list)

    @property
    def kind(self) -> Kind:
        return self.req.kind

    @property
    def wait_s(self) -> float:
        return (self.granted_at or time.time()) - self.requested_at

    @property
    def evict_s(self) -> float:
        if self.granted_at is None:
            return 0.0
        return (self.ready_at or time.time()) - self.granted_at

    def poll(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the grant; True once the GPU is ours (evictions done)."""
        if self.ready_at is not None:
            return True
        if self._grant is None:
            cond = self.arbiter._cond  # notified whenever the arbiter's state changes
            with cond:
                if not cond.wait_for(lambda: self._grant is not None or self.released_at is not None, timeout):
                    return False
        self.arbiter._run_evictions(self)
        return True

    def waiting(self, timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False):
        """Yield the queue position (see `Arbiter.position`) about every 0.25 s until the GPU is ours.

        Raises GpuBusy after `timeout` s and Cancelled when `cancelled()` says so; either way, and on
        any other exit before the grant (e.g. the generator is closed), the lease is released.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = False
        try:
            while not self.poll(0.25):
                if cancelled():
                    raise Cancelled("Cancelled while waiting for the GPU.")
                if deadline is not None and time.monotonic() > deadline:
                    raise GpuBusy(
                        f"The GPU stayed busy for over {timeout:.0f} s; try again in a moment "
                        "(or raise CLAIR_QUEUE_TIMEOUT_S)."
                    )
                pos = self.position()
                if pos["position"]:
                    yield pos
            ok = True
        finally:
            if not ok:
                self.release()

    async def waiting_async(
        self, timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False, tick: float = 1.0
    ) -> AsyncIterator[dict]:
        """`waiting()` for a caller on an event loop: the wait holds no thread.

        The lease registers a future that the shell completes (through `loop.call_soon_threadsafe`) when it
        grants or withdraws the lease, so a queue of hundreds of waiters costs hundreds of futures. Every
        `tick` s it wakes to check `cancelled()` and the timeout and yields the queue position. Only the
        grant's evictions (GPU work that blocks) take a thread; they run to the end even if the caller is
        cancelled meanwhile, and the lease is released after them (invariant 4: a tenant counts until its
        `evict()` has returned). Raises GpuBusy and Cancelled as `waiting()` does; on any exit before the
        grant the lease is released.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        fut = loop.create_future()
        with self.arbiter._lock:
            if self._grant is None and self.released_at is None:
                self._futures.append((loop, fut))
            else:
                fut.set_result(None)
        ok = False
        try:
            while not fut.done():
                await asyncio.wait((fut,), timeout=tick)
                if fut.done():
                    break
                if cancelled():
                    raise Cancelled("Cancelled while waiting for the GPU.")
                if deadline is not None and time.monotonic() > deadline:
                    raise GpuBusy(
                        f"The GPU stayed busy for over {timeout:.0f} s; try again in a moment "
                        "(or raise CLAIR_QUEUE_TIMEOUT_S)."
                    )
                pos = self.position()
                if pos["position"]:
                    yield pos
            if self._grant is not None and self._grant.evict and self.ready_at is None and self.released_at is None:
                evicting = loop.run_in_executor(None, self.arbiter._run_evictions, self)
                try:
                    await asyncio.shield(evicting)
                except asyncio.CancelledError:
                    # Release only once the evictions are over: until then their tenants are still leaving.
                    evicting.add_done_callback(lambda f: (f.cancelled() or f.exception(), self.release()))
                    ok = True
                    raise
            else:
                self.arbiter._run_evictions(self)  # no eviction: returns at once (or raises Cancelled)
            ok = True
        finally:
            if not ok:
                self.release()
            with self.arbiter._lock:
                self._futures = [(lp, f) for lp, f in self._futures if f is not fut]

    async def wait_async(
        self, timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False, tick: float = 1.0
    ) -> Lease:
        """Await the GPU without a thread (see `waiting_async`)."""
        async for _ in self.waiting_async(timeout, cancelled, tick):
            pass
        return self

    def wait(self, timeout: float | None = None, cancelled: Callable[[], bool] = lambda: False) -> Lease:
        """Block until the GPU is ours (see `waiting`)."""
        for _ in self.waiting(timeout, cancelled):
            pass
        return self

    def position(self) -> dict:
        return self.arbiter.position(self)

    def release(self) -> None:
        self.arbiter._release(self)

    def progress(self, done: int | None = None, total: int | None = None) -> None:
        """The holder is alive: a denoising step, a token. `Arbiter.stalled()` reports holders without it.

        `done` (steps or tokens so far; 0 when the work begins) and `total` (a render's steps) feed the
        estimates: the seconds per step or token are measured between calls, so a queued request's wait
        is the running work's remaining units times its own measured pace (`Arbiter.remaining_s`).
        """
        now = time.monotonic()
        self.progress_at = now
        if total is not None:
            self.total = int(total)
        if done is None:
            return
        if self._unit_at is None or done < self.done:
            # The baseline: the pace is the mean from here on (what came before, a load, the prompt's
            # encoding, is not the pace of the steps or tokens still to come).
            self._unit_at, self._unit_done, self.done = now, int(done), int(done)
            return
        if done > self.done:
            if self.first_at is None:
                self.first_at = now
            self.unit_s = (now - self._unit_at) / (done - self._unit_done)
            self.done = int(done)

    def __enter__(self) -> Lease:
        return self.wait(self.arbiter.queue_timeout_s)

    def __exit__(self, *exc) -> None:
        self.release()


def _wake_locked(lease: Lease) -> None:
    """Under the arbiter's lock: `lease` was granted or withdrawn; complete its event-loop waiters' futures.

    `call_soon_threadsafe` only queues a callback on the waiter's loop (no waiting, no I/O but the loop's
    wake-up byte), so it may run under the lock; a loop that has closed meanwhile has no one to wake.
    """
    for loop, fut in lease._futures:
        with contextlib.suppress(RuntimeError):  # a closed loop: its waiter is gone
            loop.call_soon_threadsafe(_resolve, fut)
    lease._futures.clear()


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Arbiter:
    """Grants GPU leases according to `plan()`; see the module docstring for the invariants."""

    def __init__(
        self,
        policy: Policy = "budget",
        budget_bytes: int = 0,
        chat_priority: Literal["next", "fifo"] = "next",
        queue_timeout_s: float = 900.0,
        wait_free: Callable[[int], None] | None = None,
        preempt: Preempt = "auto",
        render_slice_s: float = 3.0,
        max_preemptions: int = 10,
        pause_join_s: float = 10.0,
        max_pause_chats: int = 8,
        max_paused_s: float = 60.0,
        max_pause_share: float = 1.0,
    ):
        self.policy: Policy = policy
        self.preempt: Preempt = preempt
        self.render_slice_s = render_slice_s
        self.max_preemptions = max_preemptions
        # The bounds of one pause and of all of a render's pauses (see joins_pause, should_yield).
        self.pause_join_s = pause_join_s
        self.max_pause_chats = max_pause_chats
        self.max_paused_s = max_paused_s
        # Under preempt="always": the share of its elapsed time a render yields to chats that could run beside
        # it; past it they share the GPU with it instead (see pause_budget). 1 (the default) sets no such budget:
        # on the seed card's benchmark a budget of 0.2 or 0.5 slowed both the chats and the renders
        # (docs/performance.md, "Hiding the hand-over").
        self.max_pause_share = max_pause_share
        self.budget = int(budget_bytes)
        self.chat_priority = chat_priority
        self.queue_timeout_s = queue_timeout_s
        # Called after evictions with the bytes the request still needs: on CUDA it polls free device
        # memory, since a process may hold memory after its owner said it let go.
        self._wait_free = wait_free
        self._seq = itertools.count(1)
        # _lock protects everything below; _cond (same lock) wakes waiters when the state changes.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._tenants: dict[str, Tenant] = {}
        self._residents: dict[str, Resident] = {}
        self._changed: dict[str, float] = {}  # tenant -> time.monotonic() of its last grant/release/eviction
        self._running: dict[int, Lease] = {}
        self._tenant_grants: dict[str, int] = {}  # grants per tenant, ever
        self._waiting: dict[int, Lease] = {}
        self._use_seq = itertools.count(1)
        self._hold_ema: dict[str, float] = {"chat": 5.0, "render": 15.0}
        # Measured paces (seconds per step / per token) and reply length, from finished work: what a
        # queued request that has not started yet is estimated at (the hold EMA until one is measured).
        self._unit_ema: dict[str, float] = {"chat": 0.0, "render": 0.0}
        self._reply_tokens_ema = 200.0
        self._last_handover: dict = {}
        self.handovers: deque[dict] = deque(maxlen=20)  # the last hand-overs with evictions (for the panel)
        self.holds: deque[dict] = deque(maxlen=200)  # finished holds: kind, label, start, end (time.time())
        self.idle_evictions: deque[dict] = deque(maxlen=20)  # evict_idle_tenant(): tenant, why, s, at
        self.stats = {
            "grants": 0,
            "swaps": 0,
            "evict_failures": 0,
            "budget_exceeded": 0,
            "max_used_bytes": 0,
            "preemptions": 0,
            "partial_offload": 0,
        }
        self._listeners: list[Callable[[str, dict], None]] = []

    # -- configuration ---------------------------------------------------------------------------
    def add_tenant(self, name: str, evict: Callable[[], None]) -> None:
        with self._lock:
            self._tenants[name] = Tenant(name, evict)

    def on_event(self, fn: Callable[[str, dict], None]) -> None:
        """Subscribe to hand-over events (for the benchmark's timeline and tests)."""
        self._listeners.append(fn)

    # -- the ledger, kept in step with reality -----------------------------------------------------
    def set_resident(
        self,
        tenant: str,
        nbytes: int,
        read_at: float | None = None,
        *,
        at_least: bool = False,
        parts: Iterable[tuple[str, int]] | None = None,
    ) -> None:
        """Record what a tenant really occupies now (e.g. size_vram from Ollama's /api/ps).

        Call it with a *successful* reading only: 0 removes the tenant (e.g. Ollama unloaded its model on
        its own when keep_alive ran out). When a reading fails, the state is unknown, and unknown is never
        empty: pass `at_least=True` with the worst size the tenant may have, and the ledger keeps the
        larger of that and what it holds (it never removes a tenant). `read_at` (time.monotonic() when the
        reading was started) drops a reading that a grant, release or eviction of the tenant has made
        stale meanwhile: readings are taken outside the lock. `parts` (name, bytes): what the reading showed,
        by model, for a tenant of several parts; see `_reading_while_busy_locked`.
        """
        with self._lock:
            if read_at is not None and read_at < self._changed.get(tenant, 0.0):
                return
            cur = self._residents.get(tenant)
            busy = any(lease.req.tenant == tenant for lease in self._running.values())
            if cur is not None and cur.evicting:
                return  # the evicting request owns this entry until evict() returns
            if at_least:
                if nbytes > 0 and (cur is None or cur.bytes < nbytes):
                    seq = cur.last_used if cur else next(self._use_seq)
                    measured = cur.measured if cur else 0
                    parts = cur.parts if cur else ()
                    self._residents[tenant] = Resident(
                        tenant, int(nbytes), seq, measured=measured, unknown=True, parts=parts
                    )
            elif nbytes <= 0 and not busy:
                self._residents.pop(tenant, None)
            elif busy and cur is not None and cur.parts and parts is not None:
                self._reading_while_busy_locked(cur, int(nbytes), dict(merge_parts(parts)))
            elif nbytes > 0:
                # While a request of the tenant runs, what it brings may not show yet (a model still loading):
                # the reading raises the ledger, never lowers it, and the parts stay. Idle, it is the truth.
                seq = cur.last_used if cur else next(self._use_seq)
                size = max(int(nbytes), cur.bytes) if busy and cur else int(nbytes)
                held = cur.parts if busy and cur else ()
                self._residents[tenant] = Resident(tenant, size, seq, measured=int(nbytes), parts=held)
            self._check_budget_locked()
            self._schedule_locked()

    def _reading_while_busy_locked(self, cur: Resident, nbytes: int, shown: dict[str, int]) -> None:
        """A fresh reading, by model, of a tenant of several parts while requests of it run (invariant 14).

        A model a running request brings may not show yet (it is still loading): it stays. Any other part the
        reading does not show is gone: only a request loads a model, and none is bringing it, so Ollama
        unloaded it (to make room for another, or its keep_alive ran out). Without this, chats for different
        models that keep overlapping would hold every model any of them ever brought until the tenant is
        idle, and renders would wait or evict for memory nobody holds. The running requests lose those
        parts too (sizes only go down for them, as in `shrink`); a model the reading shows larger raises it.
        """
        mine = [ls for ls in self._running.values() if ls.req.tenant == cur.tenant]
        bringing = {ls.req.brings for ls in mine if ls.req.brings}
        kept = merge_parts([(name, b) for name, b in cur.parts if name in shown or name in bringing], shown.items())
        for ls in mine:
            if ls.req.parts and any(name not in shown and name != ls.req.brings for name, _ in ls.req.parts):
                own = tuple((name, b) for name, b in ls.req.parts if name in shown or name == ls.req.brings)
                ls.req = replace(ls.req, parts=own, need=min(ls.req.need, parts_bytes(own)), idle=min(ls.req.idle, parts_bytes(own)))
        size = max([nbytes, parts_bytes(kept)] + [ls.req.need for ls in mine])
        if kept != cur.parts or size != cur.bytes:
            log.info("ollama reading while busy: parts %s -> %s", dict(cur.parts), dict(kept))
        self._residents[cur.tenant] = Resident(cur.tenant, size, cur.last_used, measured=nbytes, parts=kept)

    def set_other(self, nbytes: int, name: str = "other") -> None:
        """GPU memory held by other processes (a desktop, a browser, another app), re-read before each plan.

        A fixed tenant: never evicted, never busy, and the budget shrinks by it while it is held.
        """
        with self._lock:
            cur = self._residents.get(name)
            if nbytes <= 0:
                if cur is None:
                    return
                self._residents.pop(name, None)
            elif cur is not None and cur.bytes == int(nbytes):
                return
            else:
                self._residents[name] = Resident(name, int(nbytes), 0, fixed=True)
            self._schedule_locked()

    def count_stat(self, name: str, n: int = 1) -> None:
        """Add to a counter shown in /status (e.g. partial_offload)."""
        with self._lock:
            self.stats[name] = self.stats.get(name, 0) + n

    def resident_bytes(self, tenant: str) -> int:
        with self._lock:
            res = self._residents.get(tenant)
            return res.bytes if res else 0

    # -- leases ----------------------------------------------------------------------------------
    def request(
        self,
        kind: Kind,
        tenant: str,
        need: int,
        idle: int | None = None,
        label: str = "",
        steps: int = 0,
        parts: Iterable[tuple[str, int]] = (),
        brings: str = "",
    ) -> Lease:
        """Queue a request for the GPU. Returns at once; `Lease.wait()`/`poll()` block until granted.

        `steps` (a render's denoising steps) lets the queue estimate it from the measured pace per step.
        `parts` (name, bytes) say what `need` is made of for a tenant of several models (see `Req.parts`),
        and `brings` which of them the request itself brings (its model, see `Req.brings`).
        """
        with self._lock:
            rid = next(self._seq)
            idle = int(need if idle is None else idle)
            req = Req(rid, kind, tenant, int(need), idle, parts=merge_parts(parts), brings=brings)
            req = replace(req, order=self._order_locked(req))
            lease = Lease(self, req, label or kind, requested_at=time.time(), total=int(steps))
            self._waiting[rid] = lease
            self._schedule_locked()
            return lease

    def lease(self, kind: Kind, tenant: str, need: int, idle: int | None = None, label: str = "") -> Lease:
        """`with arbiter.lease(...):` waits (up to queue_timeout_s), runs the block, releases."""
        return self.request(kind, tenant, need, idle, label)

    def _order_locked(self, req: Req) -> tuple[int, ...]:
        # fifo: arrival order. next: a chat goes right after the render in front of it (the running one,
        # else the first waiting one) instead of after every queued render.
        kind, rid = req.kind, req.id
        if kind == "render" or self.chat_priority == "fifo":
            return (rid, 0)
        running = [ls.req for ls in self._running.values() if ls.req.kind == "render"]
        queued = sorted((ls.req for ls in self._waiting.values() if ls.req.kind == "render"), key=lambda r: r.order)
        if self.preempt != "off" and queued and not running:
            # With preemption on, a chat that arrives while chats stream joins them (the chat model is
            # loaded: no swap) for `render_slice_s` after the render in front of it began to wait or
            # paused for them; after that it queues behind the render, so chats cannot starve it.
            head = self._waiting[queued[0].id]
            chatting = any(ls.req.kind == "chat" for ls in self._running.values())
            age = time.time() - head.requested_at
            if chatting and head.paused:
                # A paused render: the chat joins the pause (ahead of the render) within its bounds. A render
                # paused its budget for chats like this one lets it run beside it instead (see pause_budget).
                self._spend_locked(head, [req])
                if not head.req.shares and joins_pause(
                    age,
                    head.joined,
                    join_s=self.pause_join_s,
                    max_chats=self.max_pause_chats,
                    paused_s=self._paused_now(head),
                    budget_s=self._budget_locked(head, [req]),
                ):
                    head.joined += 1
                    return (queued[0].order[0], 1, 0, rid)
            elif chatting and age < self.render_slice_s:
                return (queued[0].order[0], -1, rid)
        if running:
            return (min(r.order for r in running)[0], 1, rid)
        if queued:
            return (queued[0].order[0], 1, rid)
        return (rid, 0)

    def _snapshot_locked(self) -> Snapshot:
        waiting = tuple(sorted((ls.req for ls in self._waiting.values()), key=lambda r: r.order))
        running = tuple(ls.req for ls in self._running.values())
        return Snapshot(self.policy, self.budget, dict(self._residents), running, waiting, self.preempt)

    def _schedule_locked(self) -> None:
        if not self._waiting:  # fast path: nothing to decide (half of all calls, on release)
            self._cond.notify_all()
            return
        if self.preempt == "always":
            # A paused render whose pause budget ran out resumes beside its chats at this hand-over.
            chats = [ls.req for ls in (*self._running.values(), *self._waiting.values()) if ls.req.kind == "chat"]
            for ls in list(self._waiting.values()):
                if ls.paused:
                    self._spend_locked(ls, chats)
        for grant in plan(self._snapshot_locked()):
            lease = self._waiting.pop(grant.req.id)
            self._running[lease.req.id] = lease
            lease._grant = grant
            lease.granted_at = time.time()
            cur = self._residents.get(lease.req.tenant)
            lease._tenant_was_resident = cur is not None
            lease._own_bytes = cur.bytes if cur is not None else 0
            self._tenant_grants[lease.req.tenant] = lease._tenant_grants = self._tenant_grants.get(lease.req.tenant, 0) + 1
            apply_grant(self._residents, grant, next(self._use_seq))
            now = time.monotonic()
            for name in (lease.req.tenant, *grant.evict):
                self._changed[name] = now
            self.stats["grants"] += 1
            _wake_locked(lease)
            if grant.over_budget:
                log.warning(
                    "lone tenant over budget tenant=%s need_gib=%.1f budget_gib=%.1f",
                    lease.req.tenant,
                    lease.req.need / GiB,
                    self.budget / GiB,
                )
            if not grant.evict:
                # With evictions, the grantee touches nothing until they are done: check then.
                self._check_budget_locked()
        self._cond.notify_all()

    def _check_budget_locked(self) -> None:
        # Counted: what was measured or planned, not what a failed reading made the ledger assume.
        used = sum(r.measured if r.unknown else r.bytes for r in self._residents.values())
        self.stats["max_used_bytes"] = max(self.stats["max_used_bytes"], used)
        mine = [r for r in self._residents.values() if not r.fixed and (r.bytes if not r.unknown else r.measured)]
        if self.budget > 0 and len(mine) > 1 and used > self.budget:
            self.stats["budget_exceeded"] += 1
            log.warning(
                "ledger over budget used_gib=%.2f budget_gib=%.2f residents=%s",
                used / GiB,
                self.budget / GiB,
                ",".join(f"{r.tenant}:{r.bytes / GiB:.2f}" for r in self._residents.values()),
            )

    def _run_evictions(self, lease: Lease) -> None:
        """Run the grant's evictions in the caller's thread, outside the lock (invariants 4 and 7)."""
        if lease.ready_at is not None:
            return
        if lease.released_at is not None:
            raise Cancelled("This request was withdrawn before it got the GPU.")
        grant = lease._grant
        assert grant is not None
        if not grant.evict:  # fast path: the GPU is ours at once
            lease.ready_at = time.time()
            if self._listeners:
                self._emit(
                    "start", {"id": lease.req.id, "kind": lease.kind, "label": lease.label, "at": lease.ready_at}
                )
            return
        evicted, each = self._evict_for(lease, grant)
        self._record_handover(lease, grant, evicted, each)

    def _evict_for(self, lease: Lease, grant: Grant) -> tuple[list[str], dict[str, float]]:
        """Evict the grant's tenants, then wait until the card has room. On a failure the lease is released
        and EvictionFailed raised. Returns the tenants evicted and each one's seconds."""
        evicted: list[str] = []
        each: dict[str, float] = {}
        try:
            for name in grant.evict:
                tenant = self._tenants.get(name)
                t0 = time.monotonic()
                if tenant is not None:
                    tenant.evict()
                each[name] = round(time.monotonic() - t0, 4)
                self._evicted(name)
                evicted.append(name)
                log.info(
                    "evicted tenant=%s for=%s evict_s=%.3f reason=%r",
                    name,
                    lease.label,
                    time.monotonic() - t0,
                    grant.reason,
                )
            if grant.evict and self._wait_free is not None:
                # Only what the lease's tenant does not already hold on the GPU must be free.
                own = min(lease.req.idle, lease._own_bytes) if lease._tenant_was_resident else 0
                self._wait_free(max(0, lease.req.need - own))
        except BaseException as exc:
            with self._lock:
                self.stats["evict_failures"] += 1
            # release() keeps the tenants it failed to evict in the ledger (state unknown: they still
            # count) and lets the next request try again.
            lease.release()
            if isinstance(exc, EvictionFailed):
                raise
            raise EvictionFailed(f"Could not free the GPU for this {lease.kind}: {exc}") from exc
        return evicted, each

    def _record_handover(self, lease: Lease, grant: Grant, evicted: list[str], each: dict[str, float]) -> None:
        """The lease is ready: note the hand-over (when something was evicted) and tell the listeners."""
        lease.evicted = tuple(evicted)
        lease.evict_reason = grant.reason
        lease.ready_at = time.time()
        if evicted:
            with self._lock:
                self._check_budget_locked()
        handover = {
            "to": lease.label,
            "kind": lease.kind,
            "evicted": list(evicted),
            "reason": grant.reason,
            "wait_s": round(lease.wait_s, 4),
            "evict_s": round(lease.evict_s, 4),
            "evict_each_s": each,
            "at": lease.ready_at,
        }
        with self._lock:
            if evicted:
                self._last_handover = handover
                self.handovers.append(handover)
        if evicted:
            log.info(
                "handover to=%s evicted=%s wait_s=%.3f evict_s=%.3f",
                lease.label,
                ",".join(evicted),
                lease.wait_s,
                lease.evict_s,
            )
        self._emit(
            "start",
            {
                "id": lease.req.id,
                "kind": lease.kind,
                "label": lease.label,
                "at": lease.ready_at,
                "evicted": list(evicted),
                "evict_s": handover["evict_s"],
                "evict_each_s": each,
                "wait_s": handover["wait_s"],
            },
        )

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released_at is not None:
                return
            was_running = self._release_locked(lease)
            self._schedule_locked()
        if was_running:
            self._emit("release", {"id": lease.req.id, "kind": lease.kind, "at": lease.released_at})

    def _release_locked(self, lease: Lease, final: bool = True) -> bool:
        """Take `lease` out of the state; the caller schedules. True if it was running.

        `final=False` is a pause: the hold does not count towards the estimate of a whole render's time.
        """
        lease.released_at = time.time()
        self._waiting.pop(lease.req.id, None)
        _wake_locked(lease)  # a withdrawn lease's event-loop waiters see it at once
        was_running = self._running.pop(lease.req.id, None) is not None
        if not was_running:
            return False
        tenant = lease.req.tenant
        self._changed[tenant] = time.monotonic()
        res = self._residents.get(tenant)
        still_busy = [ls for ls in self._running.values() if ls.req.tenant == tenant]
        if lease.ready_at is None:
            # Released before its GPU work began (client gone, cancel, a failed eviction): the
            # evictions it did not finish are not happening, and its own tenant never arrived.
            for name in lease._grant.evict if lease._grant else ():
                gone = self._residents.get(name)
                if gone is not None and gone.evicting:
                    self._residents[name] = replace(gone, evicting=False)
            # Its own tenant never arrived, unless a request of the tenant granted after it (and maybe done since)
            # brought it. The parts it brought stay: the reading after its release says whether they are there
            # (invariant 14); taking them out here lost a model a later chat had loaded.
            alone = self._tenant_grants.get(tenant) == lease._tenant_grants
            if not lease._tenant_was_resident and not still_busy and alone:
                self._residents.pop(tenant, None)
                res = None
        if res is not None and not res.evicting:
            # Back to idle size, but never below what the tenant itself reported.
            # The parts its grants brought stay until a reading shows what is really left: another chat may
            # have loaded a second model beside this one's (Ollama keeps both), which no idle figure includes.
            held = parts_bytes(res.parts)
            size = max([lease.req.idle, res.measured, held] + [ls.req.need for ls in still_busy])
            if size > 0:
                self._residents[tenant] = Resident(
                    tenant, size, next(self._use_seq), measured=res.measured, parts=res.parts
                )
            else:  # nothing left on the GPU (a render whose tail took its weights off): not resident
                self._residents.pop(tenant, None)
        if lease.ready_at is not None:
            self.holds.append(
                {"kind": lease.kind, "label": lease.label, "start": lease.ready_at, "end": lease.released_at}
            )
        if lease.ready_at is not None and final:
            held = lease.released_at - lease.ready_at
            ema = self._hold_ema[lease.kind]
            self._hold_ema[lease.kind] = 0.7 * ema + 0.3 * held
            if lease.unit_s:
                u = self._unit_ema[lease.kind]
                self._unit_ema[lease.kind] = lease.unit_s if not u else 0.7 * u + 0.3 * lease.unit_s
            if lease.kind == "chat" and lease.done:
                self._reply_tokens_ema = 0.7 * self._reply_tokens_ema + 0.3 * lease.done
        return True

    # -- preemption at step boundaries -------------------------------------------------------------
    def should_yield(self, lease: Lease) -> str:
        """Called by a running render between denoising steps: why it should pause now, or ""."""
        if self.preempt == "off" or lease.kind != "render" or lease.ready_at is None or not self._waiting:
            return ""  # the fast path of every step: no lock
        with self._lock:
            if lease.req.id not in self._running:
                return ""
            now = time.time()
            chats = [ls.req for ls in self._waiting.values() if ls.req.kind == "chat"]
            if self._spend_locked(lease, chats):
                self._schedule_locked()  # its pause budget is spent: chats that fit start beside it now
            # A continuation's clock starts when its pause began (it was requested then): see should_yield.
            since = lease.requested_at if lease.paused else lease.ready_at
            return should_yield(
                self._snapshot_locked(),
                lease.req,
                ran_s=now - since,
                pauses=lease.pauses,
                slice_s=self.render_slice_s,
                max_pauses=self.max_preemptions,
                paused_s=self._paused_total(lease),
                max_paused_s=self.max_paused_s,
            )

    def _budget_locked(self, lease: Lease, chats: list[Req]) -> float:
        """The render `lease` continues may have been paused this long in all for `chats` (see pause_budget)."""
        began = lease.began_at or lease.ready_at or lease.requested_at
        return pause_budget(
            self._snapshot_locked(), lease.req, chats, elapsed_s=time.time() - began, share=self.max_pause_share
        )

    def _spend_locked(self, lease: Lease, chats: list[Req]) -> bool:
        """Under preempt="always": mark a render that has been paused its budget as sharing (`Req.shares`), so
        chats that fit beside it run beside it from now on. True when it changed."""
        if self.preempt != "always" or lease.kind != "render" or lease.req.shares or not chats:
            return False
        if self._paused_now(lease) < self._budget_locked(lease, chats):
            return False
        lease.req = replace(lease.req, shares=True)
        log.info("render shares the GPU with chats from now on label=%s paused_s=%.2f", lease.label, self._paused_now(lease))
        return True

    def _paused_now(self, lease: Lease) -> float:
        """How long the render `lease` holds or continues has been paused in all, up to now."""
        if lease.paused and lease.ready_at is None:  # still paused: this pause counts up to now
            return lease.paused_s + time.time() - lease.requested_at
        return self._paused_total(lease)

    @staticmethod
    def _paused_total(lease: Lease) -> float:
        """How long the render `lease` holds was paused in all, up to its grant."""
        own = (lease.ready_at - lease.requested_at) if lease.paused and lease.ready_at is not None else 0.0
        return lease.paused_s + own

    def shrink(self, lease: Lease, need: int, idle: int = 0) -> None:
        """The render `lease` holds has entered its tail: its denoising loop is done and its UNet and text
        encoders have left the GPU (the caller moved them before calling), so from now on it needs only the
        VAE decode's peak (`need`), and `idle` once released. The ledger shrinks at once and the queue is
        planned again: a chat (or the chat model's reload) that fits beside the decode starts now instead
        of after it. Sizes only go down here, so every plan made before stays within the budget.
        """
        with self._lock:
            if lease.released_at is not None or lease.req.id not in self._running or lease.kind != "render":
                return
            need = min(int(need), lease.req.need)
            lease.req = replace(lease.req, need=need, idle=min(int(idle), need), tail=True)
            res = self._residents.get(lease.req.tenant)
            if res is not None and not res.evicting:
                others = [ls.req.need for ls in self._running.values() if ls.req.tenant == res.tenant and ls is not lease]
                self._residents[res.tenant] = replace(res, bytes=max([need, res.measured, *others]))
            self._changed[lease.req.tenant] = time.monotonic()
            self._schedule_locked()
        self._emit("tail", {"id": lease.req.id, "kind": lease.kind, "need": need, "at": time.time()})

    def pause(self, lease: Lease, reason: str = "") -> Lease:
        """Give the GPU up at a step boundary; returns the lease that continues the render.

        In one step under the lock: the continuation is queued at the head of the render queue, behind
        the chats already waiting (which is what the pause is for) but ahead of any request that arrives
        later, and `lease` is released, so the chats are granted (evicting the paused render's weights
        only if they need the room). The caller waits on the continuation like any lease, restores its
        weights, and carries on from the same step.
        """
        with self._lock:
            if lease.released_at is not None or lease.req.id not in self._running:
                raise Cancelled("This render was stopped while it paused.")
            rid = next(self._seq)
            req = replace(lease.req, id=rid, order=(lease.req.order[0] if lease.req.order else lease.req.id, 1, rid))
            nxt = Lease(self, req, lease.label, requested_at=time.time(), pauses=lease.pauses + 1, paused=True)
            # The measured pace carries over: the holder goes on counting steps where it stopped.
            nxt.done, nxt.total, nxt.unit_s, nxt.owner = lease.done, lease.total, lease.unit_s, lease.owner
            nxt.paused_s = self._paused_total(lease)
            nxt.began_at = lease.began_at or lease.ready_at
            self._waiting[rid] = nxt
            self.stats["preemptions"] += 1
            self._release_locked(lease, final=False)
            self._schedule_locked()
        log.info("render paused label=%s pauses=%d reason=%r", lease.label, nxt.pauses, reason)
        self._emit("release", {"id": lease.req.id, "kind": lease.kind, "at": lease.released_at, "paused": True})
        return nxt

    def _emit(self, event: str, data: dict) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, data)
            except Exception:  # a broken listener must not break a hand-over
                log.exception("arbiter listener failed")

    # -- healing (OOM recovery, the watchdog) ---------------------------------------------------------
    def evict_idle(self, lease: Lease) -> tuple[str, ...]:
        """Out of memory while `lease` holds the GPU: evict every idle tenant, and let no one new in beside it.

        The lease's need becomes the whole budget, so until it is released nothing is planned beside it
        (invariant 5 holds: it only conflicts more). Tenants busy with another running request stay.
        Evictions run outside the lock, as in `_run_evictions`; a failed one leaves its tenant counted.
        """
        with self._lock:
            if lease.req.id not in self._running:
                return ()
            if self.budget > 0:
                lease.req = replace(lease.req, need=max(lease.req.need, self.budget))
                own = self._residents.get(lease.req.tenant)
                if own is not None and not own.evicting:  # the ledger counts a busy tenant at its peak need
                    self._residents[lease.req.tenant] = replace(own, bytes=max(own.bytes, lease.req.need))
            busy = {ls.req.tenant for ls in self._running.values()}
            # Memory held by other programs (fixed) is not Clair's to evict: it stays in the ledger.
            names = [n for n, r in self._residents.items() if n not in busy and not r.evicting and not r.fixed]
            now = time.monotonic()
            for n in names:
                self._residents[n] = replace(self._residents[n], evicting=True)
                self._changed[n] = now
        evicted: list[str] = []
        for name in names:
            tenant = self._tenants.get(name)
            lease.progress()
            try:
                if tenant is not None:
                    tenant.evict()
            except Exception as exc:
                log.warning("out-of-memory eviction failed tenant=%s error=%s", name, exc)
                self._evict_failed(name)
                continue
            self._evicted(name)
            evicted.append(name)
        lease.progress()
        if evicted:
            log.info("evicted for an out-of-memory retry tenants=%s for=%s", ",".join(evicted), lease.label)
        return tuple(evicted)

    def _evicted(self, name: str, idle_note: dict | None = None) -> None:
        """`name`'s evict() returned: it is off the GPU, and requests waiting for that memory may go."""
        with self._lock:
            self._residents.pop(name, None)
            self._changed[name] = time.monotonic()
            self.stats["swaps"] += 1
            if idle_note is not None:
                self.idle_evictions.append(idle_note)
            self._schedule_locked()

    def _evict_failed(self, name: str) -> None:
        """`name`'s evict() raised: it stays in the ledger (its state is unknown), no longer marked leaving."""
        with self._lock:
            self.stats["evict_failures"] += 1
            res = self._residents.get(name)
            if res is not None:
                self._residents[name] = replace(res, evicting=False)
            self._schedule_locked()

    def evict_idle_tenant(self, tenant: str, idle_for_s: float = 0.0, why: str = "") -> str:
        """Take an idle tenant off the GPU without a lease (an "eject" button, the image keep-alive).

        Returns "" when it was evicted (or was not resident), else why not. Under the lock it checks that
        no running request uses the tenant, none waits for it (a reserved tenant stays: its request would
        only load it back), it is not already leaving, and it has been idle at least `idle_for_s` s; then
        it marks it evicting, which makes any request for it wait (plan: "still leaving the GPU"), so
        the eviction cannot race a render. The eviction itself runs outside the lock (invariant 8).
        """
        with self._lock:
            res = self._residents.get(tenant)
            if res is None:
                return ""
            if any(ls.req.tenant == tenant for ls in self._running.values()):
                return f"{tenant} is busy: it is unloaded only when idle"
            if any(ls.req.tenant == tenant for ls in self._waiting.values()):
                return f"a request is waiting for {tenant}"
            if res.evicting:
                return f"{tenant} is already leaving the GPU"
            if idle_for_s > 0 and time.monotonic() - self._changed.get(tenant, 0.0) < idle_for_s:
                return f"{tenant} was used less than {idle_for_s:g} s ago"
            self._residents[tenant] = replace(res, evicting=True)
            self._changed[tenant] = time.monotonic()
            evict = self._tenants.get(tenant)
        t0 = time.monotonic()
        try:
            if evict is not None:
                evict.evict()
        except Exception as exc:
            log.warning("idle eviction failed tenant=%s error=%s", tenant, exc)
            self._evict_failed(tenant)
            return f"could not unload {tenant}: {exc}"
        dt = time.monotonic() - t0
        self._evicted(tenant, {"tenant": tenant, "why": why, "evict_s": round(dt, 4), "at": time.time()})
        log.info("evicted idle tenant=%s why=%s evict_s=%.3f", tenant, why or "-", dt)
        self._emit("evict", {"tenant": tenant, "why": why, "evict_s": dt, "at": time.time()})
        return ""

    def idle_s(self, tenant: str) -> float | None:
        """Seconds since `tenant` was last granted, released or evicted; None when it is not resident or busy."""
        with self._lock:
            if tenant not in self._residents or any(ls.req.tenant == tenant for ls in self._running.values()):
                return None
            return time.monotonic() - self._changed.get(tenant, time.monotonic())

    def history(self) -> dict:
        """Copies of the recent hand-overs, holds (with the running ones open-ended) and idle evictions."""
        with self._lock:
            running = [
                {"kind": ls.kind, "label": ls.label, "start": ls.ready_at or ls.granted_at, "end": None}
                for ls in self._running.values()
                if ls.ready_at or ls.granted_at
            ]
            return {
                "handovers": [dict(h) for h in self.handovers],
                "holds": [dict(h) for h in self.holds] + running,
                "idle_evictions": [dict(e) for e in self.idle_evictions],
            }

    def stalled(self, stall_s: float) -> list[dict]:
        """Running leases whose holder showed no sign of life for `stall_s` s (since its grant, the end of
        its evictions, or its last `progress()`, whichever is latest): a hung render or CUDA call."""
        out = []
        with self._lock:
            wall, mono = time.time(), time.monotonic()
            for ls in self._running.values():
                since = wall - max(ls.granted_at or wall, ls.ready_at or 0.0)
                if ls.progress_at is not None:
                    since = min(since, mono - ls.progress_at)
                if since > stall_s:
                    out.append(
                        {"id": ls.req.id, "label": ls.label, "kind": ls.kind, "tenant": ls.req.tenant, "silent_s": round(since, 1)}
                    )
        return out

    # -- what the UI and /status show ------------------------------------------------------------
    def position(self, lease: Lease) -> dict:
        """Place in the queue, why it waits, and an estimated wait in seconds."""
        with self._lock:
            if lease.req.id not in self._waiting:
                return {"position": 0, "eta_s": 0.0, "reason": ""}
            s = self._snapshot_locked()
            ahead = [r for r in s.waiting if r.order < lease.req.order]
            return {
                "position": len(ahead) + 1,
                "eta_s": round(self._eta_locked(lease.req, ahead), 1),
                "reason": blocked_reason(s, lease.req),
            }

    def _remaining_locked(self, ls: Lease, now: float) -> float:
        """About how long `ls` (running, or waiting: then its whole run) still holds the GPU.

        From its own measured pace when it has one (a render: steps left x seconds per step; a chat:
        the usual reply length's tokens left x seconds per token), else from the pace measured on
        earlier work, else from the average hold (before anything was measured).
        """
        running = ls.req.id in self._running
        unit = ls.unit_s or self._unit_ema[ls.kind]
        if ls.kind == "render" and ls.total and unit:
            return max(0, ls.total - ls.done) * unit
        if ls.kind == "chat" and unit and (running or self._unit_ema["chat"]):
            return max(self._reply_tokens_ema - ls.done, 0.1 * self._reply_tokens_ema) * unit
        if not running:
            return self._hold_ema[ls.kind]
        started = ls.ready_at or ls.granted_at or now
        return max(0.0, self._hold_ema[ls.kind] - (now - started))

    def remaining_s(self, lease: Lease) -> float:
        """The estimate above, for the panel."""
        with self._lock:
            return round(self._remaining_locked(lease, time.time()), 1)

    def _eta_locked(self, req: Req, ahead: list[Req]) -> float:
        now = time.time()
        eta = 0.0
        avail = available(self.budget, self._residents)
        for ls in self._running.values():
            if _conflict(req, ls.req, self.policy, avail, self._residents, self.preempt):
                eta = max(eta, self._remaining_locked(ls, now))
        # Chats ahead run together, so they cost the longest chat's time; renders ahead run one by one.
        chats = [
            self._remaining_locked(self._waiting[r.id], now)
            for r in ahead
            if r.kind == "chat" and r.id in self._waiting and _conflict(req, r, self.policy, avail, self._residents, self.preempt)
        ]
        eta += max(chats, default=0.0)
        eta += sum(
            self._remaining_locked(self._waiting[r.id], now)
            for r in ahead
            if r.kind == "render" and r.id in self._waiting and _conflict(req, r, self.policy, avail, self._residents, self.preempt)
        )
        return max(0.0, eta)

    def drain_eta_s(self) -> float:
        """About how long until everything running or waiting now is done, one after another (an upper
        estimate, for "busy, try again in about N s")."""
        with self._lock:
            now = time.time()
            running = max((self._remaining_locked(ls, now) for ls in self._running.values()), default=0.0)
            return running + sum(self._remaining_locked(ls, now) for ls in self._waiting.values())

    def count(self, kind: Kind | None = None) -> int:
        """Requests of `kind` running or waiting."""
        with self._lock:
            leases = [*self._running.values(), *self._waiting.values()]
            return sum(1 for ls in leases if kind is None or ls.kind == kind)

    def responsive(self, timeout: float) -> bool:
        """Can the lock be taken within `timeout` s? False is a deadlock (the watchdog's check)."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def is_idle(self) -> bool:
        with self._lock:
            return not self._running and not self._waiting

    def status(self) -> dict:
        with self._lock:
            now = time.time()
            running = sorted(self._running.values(), key=lambda ls: ls.granted_at or 0)
            holders = [
                {
                    "id": ls.req.id,
                    "kind": ls.kind,
                    "label": ls.label,
                    "tenant": ls.req.tenant,
                    "phase": "running"
                    if ls.ready_at
                    else ("evicting" if ls._grant and ls._grant.evict else "starting"),
                    "held_s": round(now - (ls.granted_at or now), 2),
                    "owner": ls.owner,
                    "since": ls.granted_at,
                    "done": ls.done,
                    "total": ls.total,
                    "unit_s": round(ls.unit_s, 4),
                    "remaining_s": round(self._remaining_locked(ls, now), 1),
                }
                for ls in running
            ]
            s = self._snapshot_locked()
            waiting = []
            for i, req in enumerate(s.waiting):
                ahead = list(s.waiting[:i])
                lease = self._waiting[req.id]
                waiting.append(
                    {
                        "id": req.id,
                        "kind": req.kind,
                        "label": lease.label + (" (paused for a chat)" if lease.paused else ""),
                        "paused": lease.paused,
                        "owner": lease.owner,
                        "position": i + 1,
                        "eta_s": round(self._eta_locked(req, ahead), 1),
                        "waited_s": round(now - lease.requested_at, 2),
                        "reason": blocked_reason(s, req),
                    }
                )
            used = sum(r.bytes for r in self._residents.values())
            return {
                "holder": holders[0] if holders else None,
                "holders": holders,
                "waiting": waiting,
                "policy": self.policy,
                "chat_priority": self.chat_priority,
                "preempt": self.preempt,
                "budget_gb": round(self.budget / GiB, 2) if self.budget else None,
                "used_gb": round(used / GiB, 2),
                "free_gb": round((self.budget - used) / GiB, 2) if self.budget else None,
                "resident": [
                    {
                        "tenant": r.tenant,
                        "gb": round(r.bytes / GiB, 2),
                        "bytes": r.bytes,
                        "busy": any(ls.req.tenant == r.tenant for ls in self._running.values()),
                        "evicting": r.evicting,
                        "other": r.fixed,  # held by other programs: never evicted
                        "unknown": r.unknown,  # a failed reading: assumed at its worst size
                    }
                    for r in sorted(self._residents.values(), key=lambda r: r.tenant)
                ],
                "last_handover": dict(self._last_handover) or None,
                "stats": dict(self.stats),
            }
