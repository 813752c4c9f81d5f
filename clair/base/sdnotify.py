"""A tiny, dependency-free sd_notify(3) client for running Clair under systemd.

Protocol
--------
A unit with ``Type=notify`` gets ``$NOTIFY_SOCKET`` in its environment: the path of an
``AF_UNIX`` datagram socket owned by systemd (or, when it starts with ``@``, the name of
an abstract socket, where the ``@`` stands for a leading NUL byte). The service sends
newline-separated ``KEY=VALUE`` assignments in one datagram:

* ``READY=1`` once it actually serves; until then ``systemctl start`` waits (up to
  ``TimeoutStartSec=``) and units ordered after it are held back.
* ``STATUS=...`` free text that ``systemctl status`` shows.
* ``STOPPING=1`` when it begins shutting down.
* ``EXTEND_TIMEOUT_USEC=...`` asks for more time in a slow start (a model download).
* ``WATCHDOG=1`` the heartbeat. With ``WatchdogSec=`` set, systemd passes
  ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process it is meant for) and, once
  ``READY=1`` arrived, kills the service (SIGABRT) if no heartbeat comes within that time;
  ``Restart=on-failure`` then starts it again. sd_watchdog_enabled(3) recommends a beat
  every half of ``WATCHDOG_USEC``.

With ``NotifyAccess=main`` only the main PID may send: threads qualify, child processes
do not.

Why the heartbeat is gated on a health check
--------------------------------------------
A thread that sends ``WATCHDOG=1`` on a timer proves only that the interpreter still
schedules that thread: a deadlocked GPU lock, a hung CUDA call or a dead HTTP server
would all keep beating, and the watchdog would heal nothing. :class:`Watchdog` therefore
sends the heartbeat only while a caller-supplied ``check()`` says the app really works,
and otherwise publishes ``STATUS=unhealthy: ...`` so ``systemctl status`` shows why a
restart is coming.

Outside systemd (``NOTIFY_SOCKET`` unset: development, tests) every call is a no-op that
returns ``False``. Socket errors never propagate: a failing notification must not take
the app down; the first one is logged at warning level, later ones at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

__all__ = [
    "Watchdog",
    "extend_timeout",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

_SEND_TIMEOUT = 2.0  # seconds

_warned = False
_warn_lock = threading.Lock()


def _log_failure(message: str, *args: object) -> None:
    """Warn about the first failed notification only; the rest go to debug."""
    global _warned
    with _warn_lock:
        first = not _warned
        _warned = True
    log.log(logging.WARNING if first else logging.DEBUG, message, *args)


def _socket_address(value: str) -> str:
    # "@name" is Linux's abstract namespace: the address begins with a NUL byte.
    return "\0" + value[1:] if value.startswith("@") else value


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to systemd.

    Returns True when the datagram was sent, False when ``NOTIFY_SOCKET`` is unset or
    sending failed. Never raises for socket problems.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # A datagram send blocks while the receiver's queue is full; bound it so a
            # stalled receiver cannot hang the caller (or the watchdog thread) forever.
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(_socket_address(target))
            sock.sendall(state.encode("utf-8", errors="replace"))
    except (OSError, AttributeError, ValueError) as exc:
        # AttributeError: no AF_UNIX on this platform; ValueError: NUL in a path.
        _log_failure("sd_notify to %r failed: %s", target, exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(str(text).split("\n"))


def ready(status: str = "") -> bool:
    """Tell systemd the service is up (``READY=1``), optionally with a status line."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def stopping() -> bool:
    """Tell systemd the service is shutting down (``STOPPING=1``)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the free-text status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the current start/stop timeout (EXTEND_TIMEOUT_USEC).

    Send it repeatedly during a long first-run download: each one resets the deadline to
    now + ``seconds``.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """Seconds between heartbeats (half of ``WATCHDOG_USEC``), or None if not expected.

    None when ``WATCHDOG_USEC`` is unset or not a positive integer, or when
    ``WATCHDOG_PID`` is set and names another process (the variables were inherited by a
    child and are not meant for it).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return value / 2 / 1_000_000


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``interval`` seconds while ``check()`` returns True.

    Exactly ``True``: a truthy stand-in such as a coroutine (an ``async def`` check
    called without awaiting) or a response object must not pass for healthy.

    When ``check()`` returns False or raises, no heartbeat is sent for that round and
    ``STATUS=unhealthy: <reason>`` is sent instead; once it passes again the next
    heartbeat carries ``STATUS=healthy``. The check runs on the watchdog's own daemon
    thread, so a check that hangs stops the heartbeat (which is what a watchdog is for);
    keep it cheap and give it its own timeouts.
    """

    def __init__(self, check: Callable[[], bool], interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.check = check
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Watchdog:
        """Start the heartbeat thread (first round immediately). A no-op when running."""
        if self.running:
            return self
        self._stop = threading.Event()
        self._healthy = True
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread; returns at once unless a check is still running."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._beat()
            except Exception:  # never let the thread die: a dead thread means no heartbeats
                log.exception("watchdog round failed")
            if stop.wait(self.interval):
                break

    def _beat(self) -> None:
        try:
            ok = self.check()
            reason = "health check failed"
        except Exception as exc:
            ok = False
            reason = f"health check raised {type(exc).__name__}: {exc}"
        if ok is True:
            notify("WATCHDOG=1" if self._healthy else "WATCHDOG=1\nSTATUS=healthy")
            self._healthy = True
        else:
            if self._healthy:
                log.warning("watchdog: %s; withholding heartbeat", reason)
            self._healthy = False
            notify(f"STATUS=unhealthy: {_one_line(reason)}")
