"""What a chat or a render reports while it runs: its place in the queue, then its tokens.

Studio's generators yield these; the front door (clair/service/front.py) passes them on to every adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clair.arbiter import Lease


@dataclass
class Waiting:
    """A chat or render is queued for the GPU."""

    position: int
    eta_s: float
    reason: str

    def describe(self) -> str:
        return f"Waiting for the GPU: {self.reason} (position {self.position}, about {self.eta_s:.0f} s)"


@dataclass
class Queued(Waiting):
    """The first Waiting of a request in the queue, with its lease: a caller on an event loop (the front door,
    clair/service/front.py) stops pulling the generator here and awaits the grant there, holding no thread; a plain
    caller shows it like any Waiting and pulls on, which blocks until the grant."""

    lease: Lease | None = None


@dataclass
class Token:
    """A piece of the reply. The last Token of a reply may carry no text and what the engine counted:
    `usage` (prompt tokens, reply tokens) and `tool_calls` ([{name, arguments: dict}]) when tools were offered.
    Callers that only join `text` see nothing of these."""

    text: str
    usage: tuple[int, int] | None = None
    tool_calls: list[dict] | None = None
