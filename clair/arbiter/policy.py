"""The arbiter's policy: pure data in, decisions out (`plan`, `should_yield`, `joins_pause`, `pause_budget`). It does not
log, lock or mutate, so it is tested as a table and can be called speculatively. The invariants it keeps
are listed in clair/arbiter/__init__.py."""


from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["chat", "render"]
Policy = Literal["budget", "exclusive"]
Preempt = Literal["auto", "off", "always"]
GiB = 1024**3


# --------------------------------------------------------------------------------------------------
# The policy: pure data in, decisions out.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Req:
    """A request for the GPU, as the policy sees it."""

    id: int
    kind: Kind
    tenant: str  # what must be resident while it runs ("ollama", "image", "local-chat")
    need: int  # bytes its tenant occupies while this request runs (weights + activations)
    idle: int  # bytes the tenant keeps once the request is done (weights)
    order: tuple[int, ...] = ()  # queue position key; smaller goes first
    # A render whose denoising loop is done: its UNet and text encoders left the GPU and only the VAE decode
    # remains (need is the decode's peak). It no longer pauses, and it does not keep chats off the GPU.
    tail: bool = False
    # What `need` is made of, by name, for a tenant that holds several models at once (Ollama): requests
    # for different parts that run together add up in the ledger (`size`) instead of overlapping, even when
    # each was sized before the other's model was loaded. Empty: the need is one indivisible thing.
    parts: tuple[tuple[str, int], ...] = ()
    # The part this request itself brings (a chat's model): a reading taken while it runs may not show it yet
    # (the model is still loading), so the ledger keeps it. Its other parts are what its tenant held when it
    # was sized; a reading taken after its grant that shows one of them gone takes it out (`Arbiter.set_resident`).
    brings: str = ""
    # A render that has been paused its budget (`pause_budget`) under CLAIR_PREEMPT=always: from now on chats that
    # fit beside it share the GPU with it (as under auto) instead of pausing it.
    shares: bool = False


@dataclass(frozen=True, slots=True)
class Resident:
    tenant: str
    bytes: int  # footprint now (peak need while busy, weights while idle)
    last_used: int = 0  # a sequence number, for least-recently-used eviction
    evicting: bool = False
    measured: int = 0  # what the tenant itself last reported (Ollama's size_vram); 0 = never
    fixed: bool = False  # memory Clair cannot free (other processes on the card): never evicted, never "busy"
    unknown: bool = False  # `bytes` is an assumption (a failed reading), not a measurement
    # The parts its grants brought (Req.parts), kept until a reading taken while nothing of it ran replaces
    # them: what the tenant may hold that no reading has shown yet.
    parts: tuple[tuple[str, int], ...] = ()


def merge_parts(*groups: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """The union of several parts lists, each name at its largest size."""
    out: dict[str, int] = {}
    for group in groups:
        for name, nbytes in group:
            out[name] = max(out.get(name, 0), int(nbytes))
    return tuple(sorted(out.items()))


def parts_bytes(parts: Iterable[tuple[str, int]]) -> int:
    """The bytes of a parts list, its parts side by side."""
    return sum(nbytes for _, nbytes in parts)


@dataclass(frozen=True, slots=True)
class Snapshot:
    policy: Policy
    budget: int  # bytes; 0 = unknown, nothing co-resides
    residents: Mapping[str, Resident]
    running: tuple[Req, ...]
    waiting: tuple[Req, ...]  # in queue order
    preempt: Preempt = "auto"  # always: a chat never runs beside a render (the render pauses for it)


@dataclass(frozen=True, slots=True)
class Grant:
    req: Req
    evict: tuple[str, ...]
    reason: str  # why these evictions (empty when none)
    over_budget: bool = False  # a lone tenant larger than the budget


def available(budget: int, residents: Mapping[str, Resident]) -> int:
    """What Clair's tenants may use: the budget less memory held by others (fixed residents).

    0 stays "unknown". A known budget never drops to 0 here (that would read as unknown): with others
    holding all of it, nothing fits beside anything, and a lone tenant still runs.
    """
    if budget <= 0:
        return 0
    return max(1, budget - sum(r.bytes for r in residents.values() if r.fixed))


def size(req: Req, residents: Mapping[str, Resident]) -> int:
    """The bytes `req`'s tenant occupies while `req` runs, as the ledger counts them.

    Its declared need, or what the ledger already holds for its tenant when that is more (a measured
    size larger than the estimate), or, for a tenant of several parts (Ollama's models), the sum of the
    parts it holds and this request brings: two chats for different models, each sized before the other's
    model loaded, hold both. Every comparison in the policy uses this one figure, so that the
    requests it compares with each other and the ledger it plans on agree (invariant 5).
    """
    res = residents.get(req.tenant)
    if res is None or res.fixed:
        return req.need
    together = parts_bytes(merge_parts(res.parts, req.parts)) if req.parts and res.parts else 0
    return max(req.need, res.bytes, res.measured, together)


def _conflict(
    a: Req, b: Req, policy: Policy, avail: int, residents: Mapping[str, Resident], preempt: Preempt = "auto"
) -> str:
    """Why a and b cannot run at the same time ("" when they can)."""
    if a.kind == "render" and b.kind == "render":
        return "one render at a time"
    if a.tenant == b.tenant:
        return ""
    if preempt == "always" and {a.kind, b.kind} == {"chat", "render"} and not (a.tail or b.tail or a.shares or b.shares):
        return "chats get the GPU alone (CLAIR_PREEMPT=always)"
    if policy == "exclusive":
        return "exclusive policy"
    if avail <= 0:
        return "no known VRAM budget"
    if size(a, residents) + size(b, residents) > avail:
        return f"{a.tenant} and {b.tenant} do not fit together"
    return ""


def _fit(req: Req, running: Iterable[Req], residents: Mapping[str, Resident], s: Snapshot):
    """Can `req` start beside `running`? Returns (ok, evictions, reason)."""
    running = list(running)
    avail = available(s.budget, residents)
    for other in running:
        why = _conflict(req, other, s.policy, avail, residents, s.preempt)
        if why:
            return False, (), why
    if residents.get(req.tenant, Resident(req.tenant, 0)).evicting:
        return False, (), f"{req.tenant} is still leaving the GPU"

    # Busy tenants stay, at the peak of what runs on them (as the ledger counts it); so does req's own.
    busy: dict[str, int] = {}
    for r in [*running, req]:
        busy[r.tenant] = max(busy.get(r.tenant, 0), size(r, residents))
    others = [res for name, res in residents.items() if name not in busy and not res.fixed]
    leaving = [res for res in others if res.evicting]

    if s.policy == "exclusive" or avail <= 0:
        # Exclusive, or no known budget: every idle tenant other than req's own leaves first.
        if leaving:
            return False, (), "waiting for an eviction to finish"
        why = "exclusive policy" if s.policy == "exclusive" else "no known VRAM budget"
        evict = tuple(res.tenant for res in others)
        return True, evict, f"{why}: the {req.kind} gets the GPU alone" if evict else ""

    # Budget: keep what fits; evict least recently used idle tenants, only until the rest fits.
    total = sum(busy.values()) + sum(res.bytes for res in others)
    evict: list[str] = []
    for res in sorted(others, key=lambda r: r.last_used):
        if total <= avail:
            break
        if not res.evicting:
            evict.append(res.tenant)
            total -= res.bytes
    if total > avail:
        if leaving:  # a tenant still on its way out counts until it is gone (invariant 4)
            return False, (), "waiting for an eviction to finish"
        if len(busy) > 1:
            return False, (), "does not fit beside what is running"
        # A lone tenant larger than the budget: it runs alone (invariant 3).
    if not evict:
        return True, (), ""
    held = ", ".join(f"{r.tenant} {r.bytes / GiB:.1f} GiB" for r in others)
    fixed = sum(r.bytes for r in residents.values() if r.fixed)
    reason = (
        f"{req.kind} needs {size(req, residents) / GiB:.1f} GiB; with {held} resident it would exceed the "
        f"{avail / GiB:.1f} GiB budget" + (f" ({fixed / GiB:.1f} GiB held by other programs)" if fixed else "")
    )
    return True, tuple(evict), reason


def apply_grant(residents: dict[str, Resident], grant: Grant, last_used: int) -> None:
    """The ledger after `grant`: its evictions are under way, its tenant is resident at the request's size.

    The one place a grant changes the ledger: `plan()` applies it to its working copy (for the requests
    behind), and `Arbiter` to the real ledger.
    """
    for name in grant.evict:
        residents[name] = replace(residents[name], evicting=True)
    req = grant.req
    cur = residents.get(req.tenant)
    residents[req.tenant] = Resident(
        req.tenant,
        size(req, residents),
        last_used,
        measured=cur.measured if cur else 0,
        parts=merge_parts(cur.parts if cur else (), req.parts),
    )


def plan(s: Snapshot) -> list[Grant]:
    """The grants the state allows now, in queue order.

    1. Walk the waiting requests in queue order.
    2. A request that conflicts with a waiting request ahead of it stays (invariant 5).
    3. A request that conflicts with a running one stays (one render at a time; the exclusive policy;
       tenants that do not fit together).
    4. Otherwise it is granted, with the idle tenants that must leave for it (exclusive: all others;
       budget: least recently used first, only until the rest fits).
    5. Granted requests count as running for the requests behind them (`apply_grant`).

    Every size compared in 2-4 is `size()`: a request's need, or its tenant's size in the ledger when
    that is larger.
    """
    running = list(s.running)
    residents = dict(s.residents)
    ahead: list[Req] = []
    grants: list[Grant] = []
    for req in s.waiting:
        avail = available(s.budget, residents)
        # 2.
        if any(_conflict(req, a, s.policy, avail, residents, s.preempt) for a in ahead):
            ahead.append(req)
            continue
        # 3.
        ok, evict, reason = _fit(req, running, residents, s)
        if not ok:
            ahead.append(req)
            continue
        # 4.
        mine = [n for n, r in residents.items() if not r.fixed and n not in evict and n != req.tenant]
        lone = not running and not mine
        over = avail > 0 and lone and size(req, residents) > avail
        grant = Grant(req, evict, reason, over)
        grants.append(grant)
        # 5.
        running.append(req)
        apply_grant(residents, grant, 0)
    return grants


def blocked_reason(s: Snapshot, req: Req) -> str:
    """Why a waiting request is not granted (for the UI), assuming `plan` did not grant it."""
    avail = available(s.budget, s.residents)
    for a in s.waiting:
        if a.id == req.id:
            break
        why = _conflict(req, a, s.policy, avail, s.residents, s.preempt)
        if why:
            return f"waiting behind a queued {a.kind}"
    for r in s.running:
        if _conflict(req, r, s.policy, avail, s.residents, s.preempt):
            return f"GPU busy: {r.kind} in progress"
    _, _, why = _fit(req, s.running, s.residents, s)
    return why or "waiting"


def should_yield(
    s: Snapshot,
    render: Req,
    *,
    ran_s: float,
    pauses: int,
    slice_s: float,
    max_pauses: int,
    pause_order: tuple[int, ...] | None = None,
    paused_s: float = 0.0,
    max_paused_s: float = float("inf"),
) -> str:
    """Should the running `render` pause at this step boundary? The reason, or "" to carry on.

    A render pauses only when pausing lets a waiting chat start: `plan()` is run on the state the pause
    would make (the render back in the queue, its tenant idle at its weights) and must grant a chat and
    not the render itself. So a chat that fits beside the render never pauses it (it already runs), and
    with `chat_priority="fifo"` a chat that came after the render never does either.

    `ran_s` is the time since the render's last pause *began* (since it started, before its first one).
    The slice bounds how often a render pauses, not how long a chat waits: a pause that swapped models
    lasts longer than the slice (the chat model's load alone does), so a chat that arrives while the
    render resumes pauses it again at the next step. Starvation is bounded three ways (invariant 9): at
    most `max_pauses` pauses, none once the render has been paused `max_paused_s` in all, and none
    before `slice_s` has passed since the last one began. A render in its tail (the decode) never pauses.
    """
    if s.preempt == "off" or render.kind != "render" or render.tail or pauses >= max_pauses:
        return ""
    if pauses and ran_s < slice_s:
        return ""
    if paused_s >= max_paused_s:
        return ""
    if not any(r.kind == "chat" for r in s.waiting):
        return ""
    order = pause_order or (render.order[0] if render.order else render.id, 1, 2**62)
    paused = replace(render, order=order)
    residents = dict(s.residents)
    running = tuple(r for r in s.running if r.id != render.id)
    cur = residents.get(render.tenant)
    if cur is not None and not any(r.tenant == render.tenant for r in running):
        residents[render.tenant] = replace(cur, bytes=max(render.idle, cur.measured))
    waiting = tuple(sorted((*s.waiting, paused), key=lambda r: r.order))
    grants = plan(replace(s, residents=residents, running=running, waiting=waiting))
    if any(g.req.id == render.id for g in grants):
        return ""
    chats = [g for g in grants if g.req.kind == "chat"]
    if not chats:
        return ""
    return f"paused for a chat ({len(chats)} waiting that cannot run beside the render)"


def joins_pause(
    age_s: float, joined: int, *, join_s: float, max_chats: int, paused_s: float = 0.0, budget_s: float = float("inf")
) -> bool:
    """May a chat that arrives now, while a render is paused for chats, join that pause?

    `age_s`: how long the pause has lasted; `joined`: chats that joined it so far (not counting the ones
    it paused for). A chat that joins is ordered ahead of the paused render, so the render resumes only
    when no chat waits; one that does not queues behind it (and may pause it again once it runs, see
    `should_yield`). The bounds, `join_s` and `max_chats`, are what keeps a stream of chats from
    holding one pause open for ever; and where the chat could run beside the render, its pause budget
    (`pause_budget`): `paused_s` is the render's paused time in all, this pause's `age_s` included.
    """
    return age_s < join_s and joined < max_chats and paused_s < budget_s


def pause_budget(s: Snapshot, render: Req, chats: Iterable[Req], *, elapsed_s: float, share: float) -> float:
    """How long `render` may have been paused, in all, for a pause to begin or a chat to join one (seconds).

    Under CLAIR_PREEMPT=always a render pauses even for chats that could run beside it. For those it yields
    at most `share` of its elapsed time (since it first got the GPU, pauses included): past that, the chats
    share the GPU with it as under `auto` (`Req.shares`), so the render's pauses add at most about
    share / (1 - share) to its running time, plus the replies already admitted. Unbounded here (inf) when
    no chat in `chats` fits beside the render, where only pausing lets a chat run and `should_yield`'s own
    bounds apply; and under `auto` and `off`, where a chat that fits already runs beside the render.
    """
    if s.preempt != "always" or render.kind != "render" or render.shares or share >= 1:
        return float("inf")
    avail = available(s.budget, s.residents)
    if not any(c.kind == "chat" and not _conflict(render, c, s.policy, avail, s.residents, "auto") for c in chats):
        return float("inf")
    return max(0.0, share) * max(0.0, elapsed_s)
