"""Fail fast and quietly when a model cannot be had.

A load that failed (offline with nothing cached, a missing folder, a broken checkpoint) is remembered with its
reason. Until it is due again, a request is answered at once with that reason instead of paying for another
attempt (the Hugging Face client retries for 23-79 s when the hub cannot be reached). Re-checks follow a
back-off (30 s, doubling to 10 min) and run in the background, so no request waits for one. A change in what
the load reads (the folder appears or gains files, the hub cache entry changes) makes the next request try
again at once: fixing the cause is enough, no restart and no waiting.

The reason stays the model's `problem()` until a load succeeds: a page reload still shows it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from clair.base.errors import expected_load_failure

log = logging.getLogger("clair.engines.loadgate")

FIRST_RETRY_S = 30.0
MAX_RETRY_S = 600.0


def source_fingerprint(model_id: str, marker: str) -> tuple:
    """What a load of `model_id` depends on, cheaply: a folder (its existence, `marker` file, mtimes), or the
    hub cache entry of a hub id. A different value means the outcome of a load may differ."""
    if model_id == "tiny":
        return ("tiny",)
    local = Path(model_id).expanduser()
    if not local.exists():
        try:
            from huggingface_hub import constants

            cache = Path(constants.HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--"))
        except Exception:
            cache = None
        if cache is not None and cache.exists():
            local = cache / "snapshots" if (cache / "snapshots").exists() else cache
    return (str(local), _mtime(local), _mtime(local / marker), os.environ.get("HF_HUB_OFFLINE", ""))


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class LoadGate:
    """The remembered failure of one model's load, and when (or on what change) to try again."""

    def __init__(
        self,
        fingerprint: Callable[[], tuple],
        first_s: float = FIRST_RETRY_S,
        max_s: float = MAX_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fingerprint = fingerprint
        self.first_s, self.max_s = first_s, max_s
        self._clock = clock
        self._lock = threading.Lock()
        self.problem: str | None = None
        self.failures = 0
        self.retry_at = 0.0
        self._delay = first_s
        self._seen: tuple | None = None
        self._rechecking = False

    def blocked(self, recheck: Callable[[], object] | None = None) -> str | None:
        """The known problem when a load should not be tried now; None when it should (inline).

        A due re-check is started on a thread of its own with `recheck` (the load), and the known problem is
        still the answer for this request: nobody waits for the hub to time out again.
        """
        with self._lock:
            if self.problem is None:
                return None
            try:
                changed = self._fingerprint() != self._seen
            except Exception:
                changed = False
            if changed:
                return None  # the folder or cache changed: worth trying now
            due = self._clock() >= self.retry_at
            start = due and recheck is not None and not self._rechecking
            if start:
                self._rechecking = True
            problem = self.problem
        if start:
            threading.Thread(target=self._recheck, args=(recheck,), name="clair-load-recheck", daemon=True).start()
        return problem

    def _recheck(self, load: Callable[[], object]) -> None:
        try:
            load()
        except Exception as exc:  # recorded by failed(), through the load itself
            log.debug("background re-check failed: %s", exc)
        finally:
            with self._lock:
                self._rechecking = False

    def failed(self, problem: str) -> None:
        with self._lock:
            try:
                self._seen = self._fingerprint()
            except Exception:
                self._seen = None
            repeat = self.problem is not None
            self.problem = problem
            self.failures += 1
            if repeat:
                self._delay = min(self._delay * 2, self.max_s)
            else:
                self._delay = self.first_s
            self.retry_at = self._clock() + self._delay

    def failed_loading(self, problem: str, exc: BaseException, what: str, model: str, logger: logging.Logger) -> None:
        """`failed(problem)`, logged: one WARNING line for an expected condition (offline, a missing folder),
        with the trace at DEBUG, since the reason says it all; the whole trace otherwise."""
        self.failed(problem)
        if expected_load_failure(exc):
            logger.warning("%s unavailable model=%s: %s", what, model, problem)
            logger.debug("%s load failed model=%s", what, model, exc_info=exc)
        else:
            logger.error("%s load failed model=%s", what, model, exc_info=exc)

    def succeeded(self) -> None:
        with self._lock:
            self.problem, self._seen, self.failures = None, None, 0
            self._delay, self.retry_at = self.first_s, 0.0

    @property
    def delay_s(self) -> float:
        return self._delay
