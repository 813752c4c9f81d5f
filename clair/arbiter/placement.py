"""Which card a piece of in-process GPU work goes to, when the box has several: a pure policy.

`place(cards, req, ollama_cards)` takes one snapshot per card (its budget and what it holds: Clair's tenants,
Ollama's runner, other programs) and a request (a render, or a generate of the in-process chat model, with its
need) and answers with a `Placement`: the card, the idle tenants to evict there first, and the card a tenant's
old copy leaves. Like `clair.arbiter.plan` it does not log, lock, read a device or mutate its arguments, so it
is tested as a table and as a hypothesis machine (tests/test_placement.py). Each card keeps its own arbiter
(one ledger, one budget): placement only chooses which one a request is sent to.

The rule, in order:

1. A tenant that is busy on a card stays there: the request queues on that card (one copy, below).
2. Else, among the cards where the request fits beside what the card holds **without evicting anything**,
   the one where its tenant is already resident (a warm copy: no load), then the one with the most room left
   after it (so the chat model and the image model end up on different cards, and stay there), then the
   lowest index.
3. Else the card where it fits after evicting the **fewest bytes**, evicting least recently used idle
   tenants first, only until it fits; ties go to fewer evictions, then to not evicting Ollama, then to the
   lowest index.
4. Else nowhere (`Placement.card is None`, with the reason): even alone on the largest card it does not fit.

What may be evicted on a card: Clair's idle tenants, and Ollama's runner **only on a card Ollama uses**
(`ollama_cards`, from CLAIR_OLLAMA_GPUS, else from the memory its runner holds per card: `ollama_cards_from`).
Ollama's memory on a card it is not known to use, and every other program's, is fixed: never evicted.
A card with no known budget never "fits": it is chosen only by rule 3, emptied of every idle tenant.

**One copy of each model (the image model included).** A model lives on one card at a time; moving it to
another card drops the old copy (`Placement.drop_from`). Why not a warm copy on each card: SDXL's weights are
6.5 GiB in fp16 and a 1024² render peaks at 9-11 GiB in all (weights included), so a second copy costs a whole 12 GB
card and would evict the chat model from the card chat was meant to keep, which is exactly what a second card
is for. Renders are one at a time in Clair (a diffusers pipeline keeps per-call state), so a second copy would
only save a load when the first card is busy with chat; the pinned host copy already makes that load a copy
from RAM, not from disk. So: one copy, kept warm on the card it was last placed on, moved only when that card
cannot take it without evictions and another can.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["chat", "render"]
OLLAMA = "ollama"
GiB = 1024**3


@dataclass(frozen=True, slots=True)
class Held:
    """One holder of memory on a card, as the card's ledger counts it."""

    tenant: str  # Clair's tenant ("image", "local-chat"), "ollama", or another program's name
    bytes: int
    busy: bool = False  # running work: never evicted
    fixed: bool = False  # another program's memory: never evicted
    last_used: int = 0  # a sequence number: least recently used is evicted first


@dataclass(frozen=True, slots=True)
class Card:
    """One card as placement sees it."""

    index: int
    budget: int  # bytes Clair may fill on this card; 0 = unknown
    held: tuple[Held, ...] = ()

    def used(self) -> int:
        return sum(h.bytes for h in self.held)

    def holding(self, tenant: str) -> Held | None:
        return next((h for h in self.held if h.tenant == tenant), None)


@dataclass(frozen=True, slots=True)
class Request:
    kind: Kind
    tenant: str  # the in-process model it needs resident: "image" or "local-chat"
    need: int  # bytes the tenant occupies on the card while this runs (weights + activations)


@dataclass(frozen=True, slots=True)
class Placement:
    card: int | None  # None: fits on no card
    evict: tuple[str, ...] = ()  # idle tenants to evict on `card` first, in order
    fits: bool = False  # within `card`'s budget after the evictions
    drop_from: int | None = None  # the card the tenant's old copy leaves (one copy of each model)
    reason: str = ""  # why this card (for the panel and the logs)

    @property
    def evicts(self) -> bool:
        return bool(self.evict)


def ollama_cards_from(setting: str, held_per_card: Sequence[int], min_bytes: int = 256 * 1024**2) -> frozenset[int]:
    """The cards Ollama uses: CLAIR_OLLAMA_GPUS ("0", "0,1"; indices as Clair numbers its cards) when set,
    else every card on which Ollama's runner holds at least `min_bytes` (a CUDA context alone is not a model).

    Raises ValueError, naming what to write, for an index that is not a number or not one of the cards."""
    text = setting.strip()
    n = len(held_per_card)
    if not text:
        return frozenset(i for i, b in enumerate(held_per_card) if b >= min_bytes)
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) >= n:
            raise ValueError(
                f"CLAIR_OLLAMA_GPUS={setting!r}: write the indices of the cards Ollama uses, comma-separated, "
                f"each from 0 to {n - 1} (this box has {n} card{'s' if n != 1 else ''})."
            )
        out.add(int(part))
    return frozenset(out)


def evictable(card: Card, h: Held, req: Request, ollama_cards: frozenset[int]) -> bool:
    """May `h` leave `card` for `req`? Idle, Clair's or Ollama's on a card Ollama uses, not req's own."""
    if h.busy or h.fixed or h.tenant == req.tenant:
        return False
    if h.tenant == OLLAMA:
        return card.index in ollama_cards
    return True


def _cost(card: Card, req: Request, ollama_cards: frozenset[int]) -> tuple[bool, tuple[str, ...], int]:
    """(fits, evictions, bytes evicted) for `req` on `card`; fits False means not even after evicting all."""
    own = card.holding(req.tenant)
    extra = max(0, req.need - (own.bytes if own else 0))
    candidates = sorted((h for h in card.held if evictable(card, h, req, ollama_cards)), key=lambda h: h.last_used)
    if card.budget <= 0:  # unknown: nothing is assumed to fit beside it
        return False, tuple(h.tenant for h in candidates), sum(h.bytes for h in candidates)
    used = card.used()
    evict: list[Held] = []
    for h in candidates:
        if used + extra <= card.budget:
            break
        evict.append(h)
        used -= h.bytes
    return used + extra <= card.budget, tuple(h.tenant for h in evict), sum(h.bytes for h in evict)


def place(cards: Sequence[Card], req: Request, ollama_cards: frozenset[int] = frozenset()) -> Placement:
    """The card for `req` (the module docstring's rule)."""
    home = next((c for c in cards if c.holding(req.tenant)), None)
    # 1. A busy tenant stays where it runs.
    if home is not None and home.holding(req.tenant).busy:  # type: ignore[union-attr]
        return Placement(
            home.index, (), False, None, f"{req.tenant} is busy on card {home.index}: the {req.kind} waits there"
        )

    costs = {c.index: _cost(c, req, ollama_cards) for c in cards}

    def drop(c: Card) -> int | None:
        return home.index if home is not None and home.index != c.index else None

    # 2. Fits without evicting anything.
    free_fits = [c for c in cards if costs[c.index][0] and not costs[c.index][1]]
    if free_fits:
        room: Mapping[int, int] = {
            c.index: c.budget - c.used() - max(0, req.need - (h.bytes if (h := c.holding(req.tenant)) else 0))
            for c in free_fits
        }
        best = min(free_fits, key=lambda c: (c is not home, -room[c.index], c.index))
        why = "its model is already there" if best is home else f"{room[best.index] / GiB:.1f} GiB left beside it"
        return Placement(
            best.index, (), True, drop(best), f"fits on card {best.index} without evicting anything ({why})"
        )

    # 3. Fits after the fewest evicted bytes.
    fitting = [c for c in cards if costs[c.index][0]]
    if fitting:
        best = min(
            fitting,
            key=lambda c: (costs[c.index][2], len(costs[c.index][1]), OLLAMA in costs[c.index][1], c.index),
        )
        _, evict, nbytes = costs[best.index]
        return Placement(
            best.index,
            evict,
            True,
            drop(best),
            f"fits on no card as it stands; card {best.index} evicts the least ({', '.join(evict)}: {nbytes / GiB:.1f} GiB)",
        )

    # Unknown budgets: the card that would be emptied of the least.
    unknown = [c for c in cards if c.budget <= 0]
    if unknown:
        best = min(unknown, key=lambda c: (costs[c.index][2], c.index))
        return Placement(
            best.index,
            costs[best.index][1],
            False,
            drop(best),
            f"no card has a known budget it fits in; card {best.index} (budget unknown) gets it alone",
        )
    # 4. Nowhere.
    largest = max((c.budget for c in cards), default=0)
    return Placement(
        None,
        (),
        False,
        None,
        f"the {req.kind} needs {req.need / GiB:.1f} GiB; it fits on no card, even after evicting every idle model "
        f"(largest budget {largest / GiB:.1f} GiB): use a smaller size or free memory held by other programs",
    )
