"""The placement rule across cards (clair/arbiter/placement.py): a table, then a two-card hypothesis machine.

Sizes are in GiB throughout (the rule is the same at any scale); the machine keeps its own ledger of what each
card holds and checks, after every step, what the rule promises, with its own arithmetic.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from clair.arbiter.placement import OLLAMA, Card, Held, Placement, Request, ollama_cards_from, place

G = 1024**3


def card(index: int, budget: float, *held: Held) -> Card:
    return Card(index, int(budget * G), tuple(held))


def h(tenant: str, gib: float, *, busy: bool = False, fixed: bool = False, last: int = 0) -> Held:
    return Held(tenant, int(gib * G), busy=busy, fixed=fixed, last_used=last)


RENDER = Request("render", "image", int(11 * G))
CHAT = Request("chat", "local-chat", int(1.5 * G))

TABLE = [
    # (name, cards, request, ollama cards, expected card, expected evictions, expected drop_from)
    ("empty cards: the one with the most room left", [card(0, 10.5), card(1, 22.5)], RENDER, set(), 1, (), None),
    (
        "fits on the card without Ollama rather than evicting Ollama",
        [card(0, 22.5, h(OLLAMA, 6)), card(1, 10.5, h(OLLAMA, 4))],
        Request("render", "image", int(12 * G)),
        {0, 1},
        0,
        (),
        None,
    ),
    (
        "chat on card 0, the render goes to card 1 without evicting it",
        [card(0, 10.5, h("local-chat", 1.5)), card(1, 22.5)],
        RENDER,
        set(),
        1,
        (),
        None,
    ),
    (
        "the warm copy wins a tie of fitting without evictions",
        [card(0, 22.5), card(1, 22.5, h("image", 6.5))],
        RENDER,
        set(),
        1,
        (),
        None,
    ),
    (
        "the warm copy moves when its card would evict and another fits",
        [card(0, 10.5, h("image", 6.5), h(OLLAMA, 4)), card(1, 22.5)],
        RENDER,
        {0},
        1,
        (),
        0,
    ),
    (
        "nothing fits as it stands: the card that evicts the fewest bytes",
        [card(0, 12, h("local-chat", 2)), card(1, 12, h(OLLAMA, 6))],
        RENDER,
        {1},
        0,
        ("local-chat",),
        None,
    ),
    (
        "Ollama on a card it is not known to use is never evicted",
        [card(0, 12, h(OLLAMA, 6)), card(1, 12, h("local-chat", 5))],
        RENDER,
        {1},
        1,
        ("local-chat",),
        None,
    ),
    (
        "least recently used goes first, only until it fits",
        [card(0, 12, h("local-chat", 2, last=5), h(OLLAMA, 2, last=1))],
        Request("render", "image", int(9 * G)),
        {0},
        0,
        (OLLAMA,),
        None,
    ),
    (
        "equal bytes: not evicting Ollama wins",
        [card(0, 12, h(OLLAMA, 3)), card(1, 12, h("local-chat", 3))],
        RENDER,
        {0},
        1,
        ("local-chat",),
        None,
    ),
    (
        "a busy tenant keeps its work on its card",
        [card(0, 12, h("image", 11, busy=True)), card(1, 24)],
        RENDER,
        set(),
        0,
        (),
        None,
    ),
    (
        "other programs' memory is never evicted",
        [card(0, 12, h("blender", 6, fixed=True)), card(1, 12, h("local-chat", 2))],
        RENDER,
        set(),
        1,
        ("local-chat",),
        None,
    ),
    ("too large for every card: nowhere", [card(0, 10.5), card(1, 10.5)], RENDER, set(), None, (), None),
    ("a known budget beats an unknown one", [card(0, 0), card(1, 22.5)], RENDER, set(), 1, (), None),
]


@pytest.mark.parametrize(
    "cards,req,ollama,want_card,want_evict,want_drop", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_placement_rule(cards, req, ollama, want_card, want_evict, want_drop):
    p = place(cards, req, frozenset(ollama))
    assert (p.card, p.evict, p.drop_from) == (want_card, want_evict, want_drop), p.reason
    assert p.reason  # every answer says why


def test_nowhere_says_what_to_do():
    p = place([card(0, 10.5), card(1, 10.5)], RENDER)
    assert p.card is None and not p.fits
    assert "fits on no card" in p.reason and "smaller size" in p.reason


def test_placement_does_not_touch_its_arguments():
    cards = [card(0, 12, h(OLLAMA, 6)), card(1, 12, h("local-chat", 5))]
    before = repr(cards)
    place(cards, RENDER, frozenset({0, 1}))
    assert repr(cards) == before


@pytest.mark.parametrize(
    "setting,held,want",
    [
        ("", [5 * G, 0], {0}),
        ("", [0, 5 * G], {1}),
        ("", [300 * 1024**2, 5 * G], {0, 1}),  # a split model holds memory on both
        ("", [100 * 1024**2, 0], set()),  # a CUDA context alone is no model
        ("1", [5 * G, 0], {1}),  # the setting wins over the readings
        (" 0, 1 ", [0, 0], {0, 1}),
    ],
)
def test_ollama_cards(setting, held, want):
    assert ollama_cards_from(setting, held) == frozenset(want)


@pytest.mark.parametrize("bad", ["2", "gpu0", "-1", "0,,1"])
def test_ollama_cards_refuses_what_is_not_a_card(bad):
    with pytest.raises(ValueError, match=r"CLAIR_OLLAMA_GPUS=.*from 0 to 1"):
        ollama_cards_from(bad, [0, 0])


# --------------------------------------------------------------------------------------------------
# Two cards, random traffic: the machine keeps its own ledger and applies each placement to it.
# --------------------------------------------------------------------------------------------------

TENANTS = {"render": "image", "chat": "local-chat"}
IDLE = {"image": 6, "local-chat": 1}  # GiB each tenant keeps once its work is done (its weights)


class TwoCards(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.budgets = [12, 24]
        self.ledger: list[dict[str, Held]] = [{}, {}]
        self.ollama: frozenset[int] = frozenset()
        self.clock = 0
        # The last placement and what it saw; None once another step changed the cards since.
        self.last: tuple[list[Card], Request, Placement, frozenset[int]] | None = None

    def cards(self) -> list[Card]:
        return [card(i, self.budgets[i], *self.ledger[i].values()) for i in range(2)]

    @rule(kind=st.sampled_from(["render", "chat"]), need=st.integers(1, 26))
    def request(self, kind, need):
        req = Request(kind, TENANTS[kind], need * G)
        before = self.cards()
        p = place(before, req, self.ollama)
        self.last = (before, req, p, self.ollama)
        if p.card is None:
            return
        own = self.ledger[p.card].get(req.tenant)
        if own is not None and own.busy:
            return  # it queues behind its own tenant's work
        for name in p.evict:
            del self.ledger[p.card][name]
        if p.drop_from is not None:
            del self.ledger[p.drop_from][req.tenant]
        self.clock += 1
        size = max(req.need, own.bytes if own else 0)
        self.ledger[p.card][req.tenant] = Held(req.tenant, size, busy=True, last_used=self.clock)

    @rule(tenant=st.sampled_from(sorted(IDLE)))
    def finish(self, tenant):
        self.last = None
        for led in self.ledger:
            if tenant in led and led[tenant].busy:
                led[tenant] = Held(tenant, IDLE[tenant] * G, last_used=led[tenant].last_used)

    @rule(cards=st.sets(st.sampled_from([0, 1]), min_size=1), gib=st.integers(2, 8), stray=st.booleans())
    def ollama_loads(self, cards, gib, stray):
        """Ollama loads a model onto `cards` (it does not ask Clair; it may spill over a budget). With `stray`,
        its runner also holds memory on a card CLAIR_OLLAMA_GPUS does not name (the setting is what counts)."""
        self.last = None
        self.ollama = frozenset(cards)
        for i in range(2):
            self.ledger[i].pop(OLLAMA, None)
            if i in cards or stray:
                self.ledger[i][OLLAMA] = Held(OLLAMA, gib * G // len(cards), last_used=0)

    @precondition(lambda self: self.ollama)
    @rule(gib=st.integers(1, 3))
    def another_program(self, gib):
        """A program outside Clair takes memory on card 0 (fixed: nobody evicts it)."""
        self.last = None
        self.ledger[0]["other"] = Held("other", gib * G, fixed=True)

    @invariant()
    def placements_keep_their_promises(self):
        if self.last is None:
            return
        before, req, p, ollama = self.last
        if p.card is None:
            # Nowhere: not even alone on an emptied card would it fit.
            for c in before:
                keep = sum(
                    x.bytes for x in c.held if x.fixed or x.busy or (x.tenant == OLLAMA and c.index not in ollama)
                )
                assert c.budget <= 0 or keep + req.need > c.budget
            return
        target = before[p.card]
        if p.fits:
            after = sum(x.bytes for x in self.ledger[p.card].values())
            assert after <= target.budget, f"claimed fit but card {p.card} holds {after / G:.1f} GiB: {p.reason}"
        if OLLAMA in p.evict:
            assert p.card in ollama, "Ollama evicted for work on a card it does not use"
        for c in before:
            if any(x.tenant == req.tenant and x.busy for x in c.held):
                assert p.card == c.index and not p.evict
                return
        # If some card had room for it as it stood, the placement evicts nothing.
        room = [
            c.index
            for c in before
            if c.budget > 0
            and sum(x.bytes for x in c.held if x.tenant != req.tenant)
            + max(req.need, max((x.bytes for x in c.held if x.tenant == req.tenant), default=0))
            <= c.budget
        ]
        if room:
            assert p.card in room and not p.evict, (room, p)

    @invariant()
    def one_copy_of_each_model(self):
        for tenant in IDLE:
            assert sum(tenant in led for led in self.ledger) <= 1


TestTwoCards = TwoCards.TestCase
TestTwoCards.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
