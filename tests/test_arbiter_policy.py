"""The arbiter's policy as a table: state in, grants (and evictions) out. No threads, no clocks."""

from __future__ import annotations

import pytest

from clair.arbiter import GiB, Req, Resident, Snapshot, plan


def chat(i, need=5.2, tenant="ollama", order=None):
    return Req(i, "chat", tenant, int(need * GiB), int(need * GiB), order or (i, 0))


def render(i, need=15.5, idle=6.5, order=None):
    return Req(i, "render", "image", int(need * GiB), int(idle * GiB), order or (i, 0))


def res(tenant, gb, last_used=0, evicting=False, measured=0, fixed=False):
    return {tenant: Resident(tenant, int(gb * GiB), last_used, evicting, int(measured * GiB), fixed)}


def snap(policy="budget", budget=20, residents=(), running=(), waiting=()):
    merged = {}
    for r in residents:
        merged.update(r)
    return Snapshot(policy, int(budget * GiB), merged, tuple(running), tuple(waiting))


def granted(s):
    return [(g.req.id, g.evict) for g in plan(s)]


CASES = [
    # (id, snapshot, expected [(request id, evictions)])
    ("idle gpu: a chat starts", snap(waiting=[chat(1)]), [(1, ())]),
    ("idle gpu: a render starts", snap(waiting=[render(1)]), [(1, ())]),
    (
        "budget: render fits beside the idle chat model -> nothing evicted",
        snap(residents=[res("ollama", 5.2)], waiting=[render(1, need=9.2)]),
        [(1, ())],
    ),
    (
        "budget: render does not fit beside the idle chat model -> chat model evicted",
        snap(residents=[res("ollama", 5.2)], waiting=[render(1, need=15.5)]),
        [(1, ("ollama",))],
    ),
    (
        "exclusive: the idle chat model is evicted even though both fit",
        snap(policy="exclusive", residents=[res("ollama", 5.2)], waiting=[render(1, need=9.2)]),
        [(1, ("ollama",))],
    ),
    (
        "unknown budget (no CUDA, none configured) behaves as exclusive",
        snap(budget=0, residents=[res("ollama", 5.2)], waiting=[render(1, need=9.2)]),
        [(1, ("ollama",))],
    ),
    (
        "a render waits for a chat that is still streaming (does not fit beside it)",
        snap(residents=[res("ollama", 5.2)], running=[chat(1)], waiting=[render(2)]),
        [],
    ),
    (
        "budget: a render that fits starts beside a streaming chat",
        snap(residents=[res("ollama", 5.2)], running=[chat(1)], waiting=[render(2, need=9.2)]),
        [(2, ())],
    ),
    (
        "exclusive: a render waits for a streaming chat even when both would fit",
        snap(policy="exclusive", residents=[res("ollama", 5.2)], running=[chat(1)], waiting=[render(2, need=9.2)]),
        [],
    ),
    (
        "chats share the GPU with each other",
        snap(residents=[res("ollama", 5.2)], running=[chat(1)], waiting=[chat(2)]),
        [(2, ())],
    ),
    (
        "a waiting render stops new chats from joining",
        snap(residents=[res("ollama", 5.2)], running=[chat(1)], waiting=[render(2), chat(3)]),
        [],
    ),
    (
        "chats are held while a render runs",
        snap(residents=[res("image", 15.5)], running=[render(1)], waiting=[chat(2), chat(3)]),
        [],
    ),
    (
        "budget: a chat that fits beside a running render is not held",
        snap(residents=[res("image", 9.2)], running=[render(1, need=9.2)], waiting=[chat(2)]),
        [(2, ())],
    ),
    (
        "one render at a time, even when memory would allow two",
        snap(budget=80, residents=[res("image", 9)], running=[render(1, need=9)], waiting=[render(2, need=9)]),
        [],
    ),
    (
        "after a render the first chat evicts the pipeline; the next chat waits until it is gone",
        snap(residents=[res("image", 6.5)], waiting=[chat(2), chat(3), render(4)], budget=10),
        [(2, ("image",))],
    ),
    (
        "... then it joins, and the render behind them waits",
        snap(residents=[res("ollama", 5.2)], running=[chat(2)], waiting=[chat(3), render(4)], budget=10),
        [(3, ())],
    ),
    (
        "budget: the least recently used idle tenant goes first, and only as much as needed",
        snap(
            budget=20,
            residents=[res("ollama", 5.2, last_used=2), res("local-chat", 2, last_used=1)],
            waiting=[render(1, need=13.5)],
        ),
        [(1, ("local-chat",))],
    ),
    (
        "a tenant still leaving the GPU counts until it is gone",
        snap(residents=[res("ollama", 5.2, evicting=True)], running=[], waiting=[render(2, need=15.5)]),
        [],
    ),
    (
        "a lone request larger than the budget still runs, alone",
        snap(budget=20, residents=[res("ollama", 5.2)], waiting=[render(1, need=28)]),
        [(1, ("ollama",))],
    ),
    (
        "issue 7 case 3: Ollama measured larger than a chat declares -> a waiting render still holds new chats",
        # declared 4 + 15.5 fits 20, but the ledger holds Ollama at 8 GiB: 8 + 15.5 does not
        snap(residents=[res("ollama", 8, measured=8)], running=[chat(1, need=4)], waiting=[render(2), chat(3, need=4)]),
        [],
    ),
    (
        "... and once the running chat is done, the render goes first and evicts the chat model",
        snap(residents=[res("ollama", 8, measured=8)], waiting=[render(2), chat(3, need=4)]),
        [(2, ("ollama",))],
    ),
    (
        "when the ledger's sizes fit, the render starts beside the chat and the next chat joins",
        snap(residents=[res("ollama", 4, measured=4)], running=[chat(1, need=4)], waiting=[render(2), chat(3, need=4)]),
        [(2, ()), (3, ())],
    ),
    (
        "memory held by other programs shrinks the budget: the chat model must leave now",
        snap(residents=[res("other", 3, fixed=True), res("ollama", 5.2)], waiting=[render(1, need=13.5)]),
        [(1, ("ollama",))],
    ),
    (
        "other programs' memory is never evicted, and a render alone still runs over the rest",
        snap(residents=[res("other", 10, fixed=True)], waiting=[render(1, need=15.5)]),
        [(1, ())],
    ),
    (
        "exclusive: other programs' memory is not a tenant of Clair's to evict",
        snap(policy="exclusive", residents=[res("other", 2, fixed=True), res("ollama", 5.2)], waiting=[render(1)]),
        [(1, ("ollama",))],
    ),
    (
        "a chat never starts on a tenant that is being evicted",
        snap(residents=[res("ollama", 5.2, evicting=True)], running=[render(1)], waiting=[chat(2)]),
        [],
    ),
]


@pytest.mark.parametrize(("snapshot", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_policy_table(snapshot, expected):
    assert granted(snapshot) == expected


def test_policy_is_pure():
    s = snap(residents=[res("ollama", 5.2)], waiting=[render(1)])
    before = repr(s)
    assert plan(s) == plan(s)
    assert repr(s) == before


def test_over_budget_flag_only_for_a_lone_tenant():
    (g,) = plan(snap(budget=20, waiting=[render(1, need=28)]))
    assert g.over_budget
    (g,) = plan(snap(budget=20, waiting=[render(1, need=15)]))
    assert not g.over_budget


def test_next_priority_puts_a_chat_behind_one_render_not_all():
    # What Arbiter._order_locked produces for chat_priority="next": a chat arriving while render 1 runs and
    # renders 2 and 3 wait gets the key (1, 1, id), which sorts before renders 2 and 3.
    waiting = sorted([render(2), render(3), chat(4, order=(1, 1, 4))], key=lambda r: r.order)
    assert [r.id for r in waiting] == [4, 2, 3]
    # Once render 1 is done, the chat goes before render 2 (and the image pipeline leaves for it).
    s = snap(budget=20, residents=[res("image", 15.5)], waiting=waiting)
    assert granted(s) == [(4, ("image",))]


def test_budget_decisions_never_overbook_the_ledger():
    """Over a grid of states, what plan() grants never puts more than the budget on the GPU."""
    budget = 20
    for ollama_gb in (0, 2, 5.2, 9):
        for image_idle in (0, 6.5):
            for need in (8, 12, 15.5):
                residents = []
                if ollama_gb:
                    residents.append(res("ollama", ollama_gb, last_used=1))
                if image_idle:
                    residents.append(res("image", image_idle, last_used=2))
                s = snap(
                    budget=budget, residents=residents, waiting=[render(1, need=need), chat(2, need=ollama_gb or 5)]
                )
                grants = plan(s)
                evicted = {t for g in grants for t in g.evict}
                on_gpu = {name: r.bytes for name, r in s.residents.items() if name not in evicted}
                for g in grants:
                    on_gpu[g.req.tenant] = max(on_gpu.get(g.req.tenant, 0), g.req.need)
                if len(on_gpu) > 1:
                    assert sum(on_gpu.values()) <= budget * GiB, (ollama_gb, image_idle, need, grants)


def test_over_budget_flag_counts_other_programs_memory():
    (g,) = plan(snap(budget=20, residents=[res("other", 10, fixed=True)], waiting=[render(1, need=15.5)]))
    assert g.over_budget and g.evict == ()


def test_a_grant_puts_its_tenant_in_the_ledger_at_the_size_plan_compared():
    """plan() and the Arbiter apply a grant with the same function: the ledger holds Ollama's measured size."""
    from clair.arbiter import apply_grant

    s = snap(residents=[res("ollama", 8, measured=8)], waiting=[chat(1, need=4)])
    (g,) = plan(s)
    ledger = dict(s.residents)
    apply_grant(ledger, g, 1)
    assert ledger["ollama"].bytes == 8 * GiB and ledger["ollama"].measured == 8 * GiB
