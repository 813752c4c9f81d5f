"""The systemd units (systemd/) and the sd_notify client (clair/base/sdnotify.py).

Three groups:

* ``systemd-analyze verify`` on both units, in a throw-away ``--root`` (see
  ``verify_root``). verify exits 0 even for unknown keys and out-of-range values and
  only prints them (docs/facts.md, "Gradio and systemd details"), so any output is a failure.
* The properties Clair relies on, read from the unit files, so an edit that drops one
  fails here even though the unit would still be valid.
* clair.base.sdnotify against real AF_UNIX datagram sockets (a path and an abstract name).
"""

from __future__ import annotations

import configparser
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clair.base import sdnotify

ROOT = Path(__file__).resolve().parent.parent
CLAIR_UNIT = ROOT / "systemd" / "clair.service"
OLLAMA_DROPIN = ROOT / "systemd" / "ollama.service.d" / "override.conf"
# Optional: Ollama on a private port, Clair's Ollama-compatible API on 11434 (docs/gateway.md).
PRIVATE_PORT_DROPIN = ROOT / "systemd" / "ollama.service.d" / "private-port.conf"

# What Ollama's Linux installer writes to /etc/systemd/system/ollama.service (reduced to
# what matters: see docs/facts.md, "Ollama"). Ollama is not
# installed on test machines, so the test provides it for the drop-in to apply to.
OLLAMA_UNIT = """\
[Unit]
Description=Ollama Service
After=network-online.target

[Service]
ExecStart=/usr/bin/ollama serve
User=ollama
Group=ollama
Restart=always
RestartSec=3

[Install]
WantedBy=default.target
"""

# Executables the units name; verify fails ("is not executable") unless they exist
# inside --root, so the root gets stubs at exactly these paths.
STUB_EXECUTABLES = ("opt/clair/.venv/bin/clair", "usr/bin/ollama")


# --------------------------------------------------------------------------------------
# systemd-analyze verify
# --------------------------------------------------------------------------------------


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return exe


def _system_unit_dir() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(candidate, "multi-user.target").exists():
            return Path(candidate)
    pytest.skip("no systemd unit directory with multi-user.target on this machine")


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    """A minimal file system tree for ``systemd-analyze verify --root=...``.

    Found by experiment with systemd 252:
    * Without the distribution's units inside the root, verify reports
      "Unit sysinit.target not found" (and still exits 0). A symlink from the root to the
      host's directory does not work (absolute targets are resolved inside the root:
      "Too many levels of symbolic links"), so the directory is copied, keeping its
      internal alias symlinks as they are (~240 small files, a few ms).
    * User=/Group=/SupplementaryGroups= are not resolved by verify, so the root needs no
      etc/passwd or etc/group for clair/ollama/render.
    * Units and drop-ins are looked up inside the root, so the drop-in is installed where
      an administrator would put it: etc/systemd/system/ollama.service.d/override.conf.
    """
    root = tmp_path / "root"
    shutil.copytree(_system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    for rel in STUB_EXECUTABLES:
        stub = root / rel
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    etc_units = root / "etc/systemd/system"
    (etc_units / "ollama.service.d").mkdir(parents=True)
    shutil.copy(CLAIR_UNIT, etc_units / "clair.service")
    (etc_units / "ollama.service").write_text(OLLAMA_UNIT)
    shutil.copy(OLLAMA_DROPIN, etc_units / "ollama.service.d" / "override.conf")
    return root


def run_verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    # Pin what could make the output differ between machines: the log level (info is
    # the default; a user's debug setting would print chatter), colour and pager.
    env.update(SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    return subprocess.run(
        [_systemd_analyze(), "verify", f"--root={root}", *units],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr).strip()


@pytest.mark.parametrize("unit", ["clair.service", "ollama.service"])
def test_units_verify_without_any_output(verify_root: Path, unit: str) -> None:
    # ollama.service is verified with Clair's drop-in applied; clair.service pulls in
    # ollama.service too (Wants=), and verify reports errors of dependencies as well.
    result = run_verify(verify_root, unit)
    assert _output(result) == "", f"systemd-analyze verify {unit} printed:\n{_output(result)}"
    assert result.returncode == 0


@pytest.mark.parametrize(
    "edited",
    ["etc/systemd/system/clair.service", "etc/systemd/system/ollama.service.d/override.conf"],
)
def test_verify_harness_sees_mistakes(verify_root: Path, edited: str) -> None:
    """The check above is not vacuous: a typo in either file shows up in the output.

    Also proves the drop-in is really loaded from the root. (verify still exits 0 here.)
    """
    path = verify_root / edited
    path.write_text(path.read_text() + "\n[Service]\nNicee=-5\n")
    unit = "clair.service" if edited.endswith("clair.service") else "ollama.service"
    out = _output(run_verify(verify_root, unit))
    assert "Unknown key 'Nicee'" in out, out
    assert edited in out, out


def test_verify_harness_checks_execstart(verify_root: Path) -> None:
    """Without the stub, verify fails: the root (not the host) is what it checks."""
    (verify_root / STUB_EXECUTABLES[0]).unlink()
    result = run_verify(verify_root, "clair.service")
    assert result.returncode != 0
    assert "/opt/clair/.venv/bin/clair is not executable" in _output(result)


# --------------------------------------------------------------------------------------
# The properties that matter, read from the unit files
# --------------------------------------------------------------------------------------


class _MultiDict(dict):
    """configparser collects each value as a list of lines before joining them with
    newlines; extending instead of replacing keeps every occurrence of a repeated key
    (Environment=, After=, ...) the way systemd does."""

    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


class Unit:
    def __init__(self, path: Path) -> None:
        parser = configparser.RawConfigParser(
            strict=False,
            dict_type=_MultiDict,
            interpolation=None,
            comment_prefixes=("#", ";"),
            inline_comment_prefixes=None,  # systemd has no inline comments
            empty_lines_in_values=False,
        )
        parser.optionxform = str  # keys are case-sensitive in systemd
        parser.read_string(path.read_text(), source=str(path))
        self.parser = parser

    def values(self, section: str, key: str) -> list[str]:
        """Every assignment of key, in order; an empty one resets the list (systemd)."""
        if not self.parser.has_option(section, key):
            return []
        out: list[str] = []
        for line in self.parser.get(section, key).split("\n"):
            if line.strip() == "":
                out.clear()
            else:
                out.append(line.strip())
        return out

    def get(self, section: str, key: str) -> str | None:
        vals = self.values(section, key)
        return vals[-1] if vals else None  # the last assignment wins for single values

    def words(self, section: str, key: str) -> list[str]:
        return [w for v in self.values(section, key) for w in v.split()]

    def environment(self, section: str = "Service") -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.values(section, "Environment"):
            for item in shlex.split(value):
                name, _, val = item.partition("=")
                env[name] = val
        return env


def _seconds(value: str) -> float:
    """systemd time span ("60", "60s", "5min", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    for number, unit in parts:
        assert unit in units, f"unexpected time unit in {value!r}"
        total += float(number) * units[unit]
    return total


def _is_yes(value: str | None) -> bool:
    return (value or "").lower() in {"1", "yes", "true", "on"}


@pytest.fixture(scope="module")
def clair() -> Unit:
    return Unit(CLAIR_UNIT)


@pytest.fixture(scope="module")
def dropin() -> Unit:
    return Unit(OLLAMA_DROPIN)


def test_clair_is_a_notify_service_with_watchdog(clair: Unit) -> None:
    assert clair.get("Service", "Type") == "notify"
    assert clair.get("Service", "NotifyAccess") == "main"
    watchdog = clair.get("Service", "WatchdogSec")
    assert watchdog is not None and _seconds(watchdog) >= 10
    start = clair.get("Service", "TimeoutStartSec")
    assert start is not None and _seconds(start) >= 120, "first model load needs time"


def test_clair_serves_the_lan_with_users_and_room_for_connections(clair: Unit) -> None:
    from clair.base.config import Config

    env = clair.environment()
    assert _is_yes(env.get("CLAIR_LISTEN"))
    assert env.get("CLAIR_USERS_FILE", "").startswith("/var/lib/clair/")  # writable, under StateDirectory=
    nofile = clair.get("Service", "LimitNOFILE")
    assert nofile is not None and int(nofile) >= 4 * Config().max_connections


def test_clair_heals_itself(clair: Unit) -> None:
    assert clair.get("Service", "Restart") == "on-failure"
    assert clair.get("Service", "RestartSec") is not None
    # Start limits only work in [Unit] (systemd.md); in [Service] they are ignored.
    for key in ("StartLimitIntervalSec", "StartLimitBurst"):
        assert clair.get("Unit", key) is not None, key
        assert clair.get("Service", key) is None, key
    assert clair.get("Service", "KillSignal") in {"SIGINT", "SIGTERM"}
    assert clair.get("Service", "TimeoutStopSec") is not None


def test_clair_starts_after_ollama_and_network(clair: Unit) -> None:
    for key in ("After", "Wants"):
        words = clair.words("Unit", key)
        assert "ollama.service" in words, key
        assert "network-online.target" in words, key
    assert clair.words("Install", "WantedBy") == ["multi-user.target"]


def test_clair_scheduling(clair: Unit, dropin: Unit) -> None:
    nice = int(clair.get("Service", "Nice") or "0")
    assert -20 <= nice < 0
    assert clair.get("Service", "IOSchedulingClass") == "best-effort"
    assert 0 <= int(clair.get("Service", "IOSchedulingPriority") or "-1") <= 7
    assert clair.get("Service", "CPUSchedulingPolicy") not in {"fifo", "rr"}
    assert int(dropin.get("Service", "Nice") or "0") > nice, "Ollama must be less favoured"


def test_clair_runs_unprivileged_with_gpu_access(clair: Unit) -> None:
    user = clair.get("Service", "User")
    assert user and user not in {"root", "0"}
    assert clair.get("Service", "Group") not in {None, "root", "0"}
    groups = clair.words("Service", "SupplementaryGroups")
    assert {"video", "render"} <= set(groups)
    assert clair.get("Service", "DynamicUser") is None


def test_clair_paths_and_environment(clair: Unit) -> None:
    assert clair.values("Service", "EnvironmentFile") == ["-/etc/clair/clair.env"]
    assert clair.get("Service", "WorkingDirectory") == "/opt/clair"
    assert clair.get("Service", "ExecStart") == "/opt/clair/.venv/bin/clair"  # pip install's command
    assert clair.get("Service", "StateDirectory") == "clair"
    env = clair.environment()
    assert env["CLAIR_OUTPUT_DIR"] == "/var/lib/clair/outputs"
    assert env["HF_HOME"] == "/var/lib/clair/huggingface"
    # Everything the app writes must be writable under ProtectSystem=strict.
    writable = ["/var/lib/clair", *clair.words("Service", "ReadWritePaths")]
    for var in ("CLAIR_OUTPUT_DIR", "HF_HOME", "XDG_CACHE_HOME"):
        if var in env:
            assert any(env[var].startswith(w.lstrip("-") + "/") for w in writable), var


def test_clair_hardening_keeps_cuda_working(clair: Unit) -> None:
    assert _is_yes(clair.get("Service", "NoNewPrivileges"))
    assert clair.get("Service", "ProtectSystem") in {"full", "strict"}
    assert _is_yes(clair.get("Service", "ProtectHome"))
    assert _is_yes(clair.get("Service", "PrivateTmp"))
    # CUDA needs /dev/nvidia* and writable+executable memory for its JIT.
    assert not _is_yes(clair.get("Service", "PrivateDevices"))
    assert not _is_yes(clair.get("Service", "MemoryDenyWriteExecute"))
    assert clair.get("Service", "DevicePolicy") in {None, "auto"}


def test_private_port_dropin_verifies_and_moves_ollama_off_11434(verify_root: Path) -> None:
    dropins = verify_root / "etc/systemd/system/ollama.service.d"
    shutil.copy(PRIVATE_PORT_DROPIN, dropins / PRIVATE_PORT_DROPIN.name)
    result = run_verify(verify_root, "ollama.service")
    assert _output(result) == "" and result.returncode == 0, _output(result)
    # systemd applies drop-ins in file name order: the later OLLAMA_HOST wins.
    env: dict[str, str] = {}
    for path in sorted(dropins.iterdir()):
        env.update(Unit(path).environment())
    assert env["OLLAMA_HOST"] == "127.0.0.1:11435"
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1"  # override.conf still applies
    # What docs/gateway.md tells Clair, and what Clair accepts together.
    from clair.base import config

    doc = (ROOT / "docs" / "gateway.md").read_text()
    assert "OLLAMA_HOST=127.0.0.1:11435" in doc and "CLAIR_OLLAMA_PORT=11434" in doc
    cfg = config.load([], {"OLLAMA_HOST": env["OLLAMA_HOST"], "CLAIR_OLLAMA_PORT": "11434"})
    assert cfg.ollama_url == "http://127.0.0.1:11435" and cfg.ollama_port == 11434
    with pytest.raises(config.ConfigError, match="forward to itself"):
        config.load([], {"OLLAMA_HOST": "127.0.0.1:11434", "CLAIR_OLLAMA_PORT": "11434"})


def test_ollama_dropin(dropin: Unit) -> None:
    assert dropin.parser.sections() == ["Service"]
    env = dropin.environment()
    # OLLAMA_KEEP_ALIVE: a Go duration or a number of seconds (the env var accepts both).
    assert re.fullmatch(r"-?\d+|-?(\d+(h|m|s|ms))+", env["OLLAMA_KEEP_ALIVE"])
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    assert env["OLLAMA_NUM_PARALLEL"] == "1"
    assert env["OLLAMA_HOST"] == "127.0.0.1:11434"
    assert dropin.get("Service", "Nice") is not None


# --------------------------------------------------------------------------------------
# clair.base.sdnotify against real sockets
# --------------------------------------------------------------------------------------

RECV_TIMEOUT = 2.0  # upper bound for a datagram that should arrive; normally instant


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify.sock"
        if len(os.fsencode(path)) >= 104:  # sun_path limit (108 on Linux, 104 elsewhere)
            pytest.skip(f"tmp_path too long for an AF_UNIX socket path: {path}")
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    else:
        if not sys.platform.startswith("linux"):
            pytest.skip("abstract AF_UNIX sockets are Linux-only")
        name = f"clair-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    sock.settimeout(RECV_TIMEOUT)
    with sock:
        yield sock


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_silent(sock: socket.socket, wait: float) -> None:
    sock.settimeout(wait)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return
    finally:
        sock.settimeout(RECV_TIMEOUT)
    raise AssertionError(f"unexpected datagram {data!r}")


def test_ready_sends_ready(notify_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert recv(notify_socket) == "READY=1"
    assert sdnotify.ready("serving on :7860") is True
    assert recv(notify_socket) == "READY=1\nSTATUS=serving on :7860"


def test_status_stopping_extend(notify_socket: socket.socket) -> None:
    assert sdnotify.status("loading SDXL\nstep 2") is True
    assert recv(notify_socket) == "STATUS=loading SDXL step 2"  # newline would split it
    assert sdnotify.stopping() is True
    assert recv(notify_socket) == "STOPPING=1"
    assert sdnotify.extend_timeout(90) is True
    assert recv(notify_socket) == "EXTEND_TIMEOUT_USEC=90000000"


def test_notify_without_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False


def test_notify_errors_are_swallowed_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sdnotify, "_warned", False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.DEBUG, logger=sdnotify.__name__):
        assert sdnotify.notify("READY=1") is False
        assert sdnotify.notify("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "nobody-listens.sock" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("60000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("60000000", "x", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert sdnotify.watchdog_interval() == expected


class ScriptedCheck:
    """A health check that answers from a script (True/False/an exception to raise),
    then blocks until released, so the datagrams the watchdog sends are deterministic."""

    def __init__(self, *script: bool | BaseException) -> None:
        self.script = list(script)
        self.release = threading.Event()
        self.exhausted = threading.Event()

    def __call__(self) -> bool:
        if not self.script:
            self.exhausted.set()
            self.release.wait(5)
            return False
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


@pytest.fixture
def start_watchdog() -> Iterator[Callable[..., sdnotify.Watchdog]]:
    started: list[tuple[sdnotify.Watchdog, Callable[[], bool]]] = []

    def start(check: Callable[[], bool], interval: float = 0.01) -> sdnotify.Watchdog:
        dog = sdnotify.Watchdog(check, interval)
        started.append((dog, check))
        return dog.start()

    yield start
    for dog, check in started:
        if isinstance(check, ScriptedCheck):
            check.release.set()
        dog.stop()


def test_watchdog_beats_only_while_healthy(
    notify_socket: socket.socket, start_watchdog: Callable[..., sdnotify.Watchdog]
) -> None:
    check = ScriptedCheck(True, True, False, False, True)
    start_watchdog(check)
    received = [recv(notify_socket) for _ in range(5)]
    assert received[:2] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert received[2:4] == ["STATUS=unhealthy: health check failed"] * 2
    assert received[4] == "WATCHDOG=1\nSTATUS=healthy"  # recovery clears the status
    assert check.exhausted.wait(RECV_TIMEOUT)
    # The script's end answers False once released: a STATUS line, never a heartbeat.
    check.release.set()
    assert recv(notify_socket) == "STATUS=unhealthy: health check failed"


def test_watchdog_unhealthy_sends_no_heartbeat(
    notify_socket: socket.socket, start_watchdog: Callable[..., sdnotify.Watchdog]
) -> None:
    start_watchdog(lambda: False)
    for _ in range(5):  # five rounds at 10 ms
        message = recv(notify_socket)
        assert "WATCHDOG=1" not in message
        assert message.startswith("STATUS=unhealthy: ")


def test_watchdog_survives_a_raising_check(
    notify_socket: socket.socket, start_watchdog: Callable[..., sdnotify.Watchdog]
) -> None:
    check = ScriptedCheck(RuntimeError("GPU lock stuck"), True)
    dog = start_watchdog(check)
    assert recv(notify_socket) == "STATUS=unhealthy: health check raised RuntimeError: GPU lock stuck"
    assert recv(notify_socket) == "WATCHDOG=1\nSTATUS=healthy"
    assert check.exhausted.wait(RECV_TIMEOUT)
    assert dog.running


def test_watchdog_truthy_non_bool_is_not_healthy(
    notify_socket: socket.socket, start_watchdog: Callable[..., sdnotify.Watchdog]
) -> None:
    start_watchdog(lambda: "yes")  # e.g. an un-awaited coroutine or a response object
    assert recv(notify_socket).startswith("STATUS=unhealthy")


def test_watchdog_stop_is_immediate_and_final(
    notify_socket: socket.socket, start_watchdog: Callable[..., sdnotify.Watchdog]
) -> None:
    dog = start_watchdog(lambda: True, interval=30.0)
    assert recv(notify_socket) == "WATCHDOG=1"  # the first round runs at once
    began = time.monotonic()
    dog.stop()
    # Far below the 30 s interval, with room for a loaded machine (it once took over 1 s there).
    assert time.monotonic() - began < 10.0, "stop() must not wait for the interval"
    assert not dog.running
    assert_silent(notify_socket, 0.05)


def test_watchdog_stop_ends_fast_beats(
    notify_socket: socket.socket, start_watchdog: Callable[..., sdnotify.Watchdog]
) -> None:
    dog = start_watchdog(lambda: True, interval=0.01)
    for _ in range(3):
        assert recv(notify_socket) == "WATCHDOG=1"
    dog.stop()
    assert not dog.running
    # Drain what was sent before the thread ended; after that nothing may arrive.
    notify_socket.setblocking(False)
    try:
        while True:
            notify_socket.recv(4096)
    except BlockingIOError:
        pass
    assert_silent(notify_socket, 0.1)  # ten intervals


def test_watchdog_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        sdnotify.Watchdog(lambda: True, 0)
