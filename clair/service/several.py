"""Several cards: which card each piece of work goes to, with one arbiter (ledger, budget) per card.

Studio keeps one `Arbiter` per card (`Studio.arbiters`) and composes them; none of them knows the others.
This module owns the choices between them:

* `ollama_cards(cfg)`: the cards Ollama uses (CLAIR_OLLAMA_GPUS; empty: card 0). Ollama's tenant is planned by
  the arbiter of the first of them, so only work placed on that card can evict it.
* `first_image_card(cfg, ollama)`: where the image worker starts: the largest card Ollama does not use (with
  nothing loaded yet, placement's "most room left beside it" rule picks it too), so the first render does not
  move the worker.
* `place_image(studio, need)`: before each render, clair/arbiter/placement.py's rule over every card's ledger:
  the card where it fits without evicting anything, its warm copy's card first; else where it evicts the
  least. When that is another card, the worker moves there (one copy of the model: the old one goes with the
  old worker), and the old card's ledger drops it.

With one card all of this is a no-op: every tenant is on card 0.
"""

from __future__ import annotations

import logging

from clair.arbiter import placement
from clair.base.config import Config
from clair.base.errors import ConfigError

log = logging.getLogger("clair.service.several")


def card_count(cfg: Config) -> int:
    """Cards Clair plans on: each simulated card with workers (real CUDA cards beyond the first are not
    enumerated: that would initialise CUDA in this process), else one."""
    return len(cfg.sim_gpu_sizes) if cfg.workers == "on" and len(cfg.sim_gpu_sizes) > 1 else 1


def ollama_cards(cfg: Config) -> frozenset[int]:
    n = card_count(cfg)
    if n == 1 or not cfg.ollama_gpus.strip():
        return frozenset({0})
    try:
        return placement.ollama_cards_from(cfg.ollama_gpus, [0] * n)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def first_image_card(cfg: Config, ollama: frozenset[int]) -> int:
    n = card_count(cfg)
    if n == 1:
        return 0
    sizes = cfg.sim_gpu_sizes
    return max(range(n), key=lambda i: (i not in ollama, sizes[i], -i))


def snapshot(arbiters) -> list[placement.Card]:
    """Every card as placement sees it, from its arbiter's ledger."""
    cards = []
    for i, arbiter in enumerate(arbiters):
        held = tuple(
            placement.Held(r["tenant"], int(r["bytes"]), bool(r["busy"] or r["evicting"]), bool(r["other"]), n)
            for n, r in enumerate(arbiter.status()["resident"])
        )
        cards.append(placement.Card(i, arbiter.budget, held))
    return cards


def place_image(studio, need: int) -> placement.Placement | None:
    """Choose the image model's card for a render needing `need` bytes, and move its worker there if need be
    (then load the model in the new worker, before the render asks for the GPU). None with one card.

    The caller holds `studio.place_lock` until the render's request is queued on the card's arbiter: a render
    running or queued on the image model's card keeps every later one there (one copy of the model)."""
    if len(studio.arbiters) == 1:
        return None
    image = studio.image
    old = studio.tenant_card.get(image.tenant, 0)
    there = studio.arbiters[old].status()
    if any(h["tenant"] == image.tenant for h in there["holders"]) or any(w["kind"] == "render" for w in there["waiting"]):
        return None  # a render runs or waits on its card: this one queues behind it there
    studio.sync()  # every ledger as the cards really are
    chosen = placement.place(
        snapshot(studio.arbiters), placement.Request("render", image.tenant, need), studio.ollama_cards
    )
    if chosen.card is None or chosen.card == old:
        return chosen
    log.info("render placed on card %d (was card %d): %s", chosen.card, old, chosen.reason)
    image.move_to(chosen.card)
    studio.tenant_card[image.tenant] = chosen.card
    studio.arbiters[old].set_resident(image.tenant, 0)  # its worker, and the memory it held, are gone
    image.load()  # from disk to host memory in the new worker, before the render holds the GPU
    return chosen
