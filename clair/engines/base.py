"""What every GPU engine offers Studio, and a small store for what Clair measured.

An *engine* is anything that occupies the GPU as an arbiter tenant: the Ollama server, the in-process
chat model, the SDXL pipeline. Studio treats them alike, through this protocol:

* `name`, `tenant` (its name in the arbiter's ledger) and `device`, where it holds memory: `gpu:0` (this
  machine's GPU, or the CPU standing in for it) or `remote` (another machine: it holds none of ours, is
  never evicted and never held back). A second GPU would be `gpu:1` with an arbiter of its own.
* `problem()`: None when it can work, else what is wrong and what to do.
* `load()`: host-side work before asking for the GPU (read weights into RAM). Never touches the GPU.
  `needs_load()` says whether it has any to do.
* `footprint(...)` -> (bytes while working, bytes while idle) on the GPU; `measured(...)` -> the size the
  engine itself observed once loaded, or None before (then the footprint is a conservative estimate).
* `evict()`: leave the GPU; returns only once the memory is free (or raises EvictionFailed).
* `attach(arbiter)`: the arbiter of its device, for leases the engine takes itself (Ollama's warm-up).
* `sync(arbiter)`: before each plan, tell the ledger what the engine really holds. An engine that cannot
  tell (a failed reading) reports the worst case (`Arbiter.set_resident(..., at_least=True)`), never "empty".
* `after_grant(lease, model)` and `after_release(lease)`: hooks around every lease, whoever holds it
  (Ollama re-reads what it holds after its own chats, and warms its model again after a render evicted it).
* `held_outside()`: GPU bytes it holds in another process of this machine (the Ollama server; None when
  unknown), which the device's use must not count as "other programs". In-process engines hold 0 there.
* `seen(arbiter)`: what it holds now by its own account, Clair's requests or not (for /status: the models
  Ollama has loaded); None when the reading failed. `sync()` is done on the way.
* `single_model`: it serves one model only (the in-process chat), so a client's model name (OpenAI
  clients send theirs) means its model. `problem()` of an engine that `needs_load()` is answered by the
  load itself (a failed load is re-tried when due), not before it.
* `notice()`: a line about the engine for the Chat tab, or "".
* `heals_stalls`, `worker_trouble()`, `worker_restarts()`: an engine run in worker processes
  (clair/engines/worker.py) kills and restarts a stalled worker itself, says when its workers keep dying
  (then /healthz fails), and counts restarts per card.

Nothing outside an engine asks which engine it is: Studio, the front door and the adapters go through
these.

`Engine` is also a base class with the do-nothing defaults, so an engine only writes what it needs.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clair.arbiter.policy import parts_bytes
from clair.base.helpers import write_private

if TYPE_CHECKING:
    from clair.arbiter import Arbiter, Lease

log = logging.getLogger("clair.engines.base")

LOCAL_GPU = "gpu:0"
REMOTE = "remote"


class Engine:
    """The engine protocol, with defaults (see the module docstring)."""

    name: str = ""
    tenant: str = ""
    device: str = LOCAL_GPU

    @property
    def on_this_gpu(self) -> bool:
        return self.device != REMOTE

    def attach(self, arbiter: Arbiter) -> None:
        """Called once by Studio: the arbiter this engine's device is planned by (for its own leases)."""

    def problem(self, *args: Any) -> str | None:
        return None

    def load(self) -> Any:
        return None

    def blocked(self) -> str | None:
        """A known load failure, answered at once while it is not due for a re-check (clair/engines/loadgate.py)."""
        return None

    def needs_load(self) -> bool:
        """True when `load()` has real work to do (Studio tells the user it is loading first)."""
        return False

    def footprint(self, *spec: Any) -> tuple[int, int]:
        raise NotImplementedError

    def to_load(self, *spec: Any) -> int:
        """GPU bytes the work will still take when it starts (a model not loaded yet): what a grant's
        preflight checks against the card's free memory (Studio.preflight). 0: nothing new."""
        return 0

    def parts(self, *spec: Any) -> tuple[tuple[str, int], ...]:
        """What the footprint is made of, by name, for an engine that holds several models at once (Ollama):
        the ledger adds up concurrent requests for different parts (Req.parts). Empty: one indivisible thing."""
        return ()

    def brings(self, *spec: Any) -> str:
        """Which of `parts` the work itself brings (the model a chat loads): "" for one indivisible thing."""
        return ""

    def sized(self, *spec: Any) -> tuple[int, int, tuple[tuple[str, int], ...], str]:
        """(need, idle, parts, brings) for a lease: for an engine of several parts, the need is the sum of the
        parts, taken from one snapshot of what it holds (so the two cannot disagree); else its footprint."""
        parts = self.parts(*spec)
        if not parts:
            return (*self.footprint(*spec), (), "")
        total = parts_bytes(parts)
        return total, total, parts, self.brings(*spec)

    def measured(self, *spec: Any) -> int | None:
        return None

    def evict(self) -> None:
        raise NotImplementedError

    def sync(self, arbiter: Arbiter) -> None:
        """In-process engines need none: the ledger's entry for them is the truth (Clair moves them)."""

    def after_grant(self, lease: Lease, model: str | None = None) -> None:
        pass

    def after_release(self, lease: Lease) -> None:
        pass

    single_model: bool = False

    def held_outside(self) -> int | None:
        return 0

    def seen(self, arbiter: Arbiter) -> list[dict] | None:
        return []

    def notice(self) -> str:
        return ""

    # With several cards, an engine whose worker Studio may move to another card (the image model: placement,
    # clair/service/several.py) is known to every card's arbiter; the others to their own card's only.
    moves_between_cards: bool = False

    # An engine run by worker processes (clair/engines/worker.py) heals its own stalls: it kills and restarts
    # the worker, so a stall of its lease is not a reason to fail /healthz.
    heals_stalls: bool = False

    def worker_trouble(self) -> str | None:
        """Why its workers cannot be trusted any more (they keep dying), else None."""
        return None

    def worker_restarts(self) -> dict[str, int]:
        """Worker restarts so far, per card label ("0", "1"); empty for an engine without workers."""
        return {}

    def close(self) -> None:
        """Stop what the engine started (its worker processes). An in-process engine has nothing to stop."""


class StateFile:
    """A small JSON file of facts Clair measured, kept across restarts (e.g. Ollama's loaded sizes).

    Written atomically and 0600 (clair.base.helpers.write_private), so a crash leaves the old
    file or the new one, never half of one. A missing or unreadable file is an empty state: everything in
    it can be measured again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self._data = data
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("state file unreadable, starting afresh path=%s error=%s", self.path, exc)

    def get(self, section: str, key: str) -> Any:
        with self._lock:
            value = self._data.get(section, {})
            return value.get(key) if isinstance(value, dict) else None

    def section(self, section: str) -> dict[str, Any]:
        with self._lock:
            value = self._data.get(section, {})
            return dict(value) if isinstance(value, dict) else {}

    def put(self, section: str, key: str, value: Any) -> None:
        with self._lock:
            part = self._data.setdefault(section, {})
            if not isinstance(part, dict):
                part = self._data[section] = {}
            if part.get(key) == value:
                return
            part[key] = value
            text = json.dumps(self._data, indent=1, sort_keys=True)
            try:
                write_private(self.path, text)
            except OSError as exc:  # a read-only disk costs the memory across restarts, nothing else
                log.warning("could not write the state file path=%s error=%s", self.path, exc)
