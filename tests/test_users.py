"""The users file and its commands: no password stored or printed, mode 0600, atomic writes, stdin and TTY entry."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clair.edge import users as users_mod
from clair.edge.users import UserError, Users, command

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAIR_")}
    return {**env, "CLAIR_USERS_FILE": str(tmp / "state" / "users.json")}


def _run(tmp: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        input=stdin,
        env=_env(tmp),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_file_holds_salted_hashes_only_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "users.json"
    old = os.umask(0)  # even a wide-open umask must not make the file readable by others
    try:
        Users(path).set_password("alice", PASSWORD)
        Users(path).set_password("bob", PASSWORD)
    finally:
        os.umask(old)
    raw = path.read_bytes()
    assert PASSWORD.encode() not in raw
    assert PASSWORD.encode().hex().encode() not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    entries = json.loads(raw)["users"]
    assert set(entries) == {"alice", "bob"}
    assert entries["alice"]["salt"] != entries["bob"]["salt"]  # salted: same password, different hashes
    assert entries["alice"]["hash"] != entries["bob"]["hash"]
    assert entries["alice"]["scheme"] == "scrypt" and entries["alice"]["n"] >= 2**14
    assert [p.name for p in path.parent.iterdir()] == ["users.json"]  # no temporary file left behind


def test_verify(tmp_path: Path) -> None:
    users = Users(tmp_path / "users.json")
    assert users.names() == [] and not users
    users.set_password("alice", PASSWORD)
    assert users.verify("alice", PASSWORD)
    assert not users.verify("alice", PASSWORD + "x")
    assert not users.verify("alice", "")
    assert not users.verify("mallory", PASSWORD)
    assert not users.verify(None, None)  # type: ignore[arg-type]
    users.set_password("alice", "another password")  # change
    assert not users.verify("alice", PASSWORD) and users.verify("alice", "another password")
    assert users.names() == ["alice"]


def test_unknown_names_cost_a_full_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing must not tell whether a name exists: an unknown name is checked against a dummy hash."""
    users = Users(tmp_path / "users.json")
    users.set_password("alice", PASSWORD)
    users.verify("warm-up", "x")  # makes the dummy entry once
    calls = []
    real = users_mod.hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(users_mod.hashlib, "scrypt", counting)
    users.verify("alice", "wrong")
    users.verify("nobody", "wrong")
    assert calls == [2**15, 2**15]


def test_another_process_sees_changes_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    reader, writer = Users(path), Users(path)
    assert reader.names() == []
    writer.set_password("alice", PASSWORD)
    assert reader.names() == ["alice"] and reader.verify("alice", PASSWORD)
    writer.delete("alice")
    assert reader.names() == []


@pytest.mark.parametrize(
    ("name", "password", "detail"),
    [
        ("bad name", PASSWORD, "user name"),
        ("-x", PASSWORD, "user name"),
        ("", PASSWORD, "user name"),
        ("alice", "short", "at least 8"),
    ],
)
def test_bad_names_and_passwords_are_refused(tmp_path: Path, name: str, password: str, detail: str) -> None:
    with pytest.raises(UserError, match=detail):
        Users(tmp_path / "users.json").set_password(name, password)
    assert not (tmp_path / "users.json").exists()


def test_unreadable_file_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="adduser"):
        Users(path).names()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_entry_asks_twice_and_refuses_a_mismatch(tmp_path: Path) -> None:
    users = Users(tmp_path / "users.json")
    answers = iter([PASSWORD, PASSWORD + "!"])
    with pytest.raises(UserError, match="differ"):
        command(["adduser", "alice"], users, out=io.StringIO(), stdin=FakeTTY(), prompt=lambda _p: next(answers))
    assert users.names() == []
    answers = iter([PASSWORD, PASSWORD])
    out = io.StringIO()
    assert command(["adduser", "alice"], users, out=out, stdin=FakeTTY(), prompt=lambda _p: next(answers)) == 0
    assert users.verify("alice", PASSWORD)
    assert PASSWORD not in out.getvalue()


def test_adduser_reads_one_line_from_stdin_and_prints_no_secret(tmp_path: Path) -> None:
    proc = _run(tmp_path, "adduser", "alice", stdin=PASSWORD + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "Added user alice" in proc.stdout
    path = tmp_path / "state" / "users.json"
    assert Users(path).verify("alice", PASSWORD)
    raw = path.read_text()
    assert PASSWORD not in raw and PASSWORD not in proc.stdout + proc.stderr
    entry = json.loads(raw)["users"]["alice"]
    listed = _run(tmp_path, "users")
    assert listed.returncode == 0 and listed.stdout.split() == ["alice"]
    assert entry["hash"] not in listed.stdout and entry["salt"] not in listed.stdout
    proc = _run(tmp_path, "adduser", "alice", stdin="")
    assert proc.returncode == 2 and "standard input" in proc.stderr
    proc = _run(tmp_path, "deluser", "alice")
    assert proc.returncode == 0 and Users(path).names() == []
    proc = _run(tmp_path, "deluser", "alice")
    assert proc.returncode == 2 and "no user 'alice'" in proc.stderr


def test_adduser_on_a_real_terminal(tmp_path: Path) -> None:
    """Through a pseudo-terminal, as a person types it: asked twice, never echoed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: app.py with the pty as its controlling terminal
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, str(ROOT / "app.py"), "adduser", "carol"], _env(tmp_path))
    seen = b""

    def read_until(text: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 1024)
                except OSError:
                    break

    read_until(b"New password:")
    os.write(fd, PASSWORD.encode() + b"\n")
    read_until(b"Repeat it:")
    os.write(fd, PASSWORD.encode() + b"\n")
    read_until(b"Added user carol")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert PASSWORD.encode() not in seen  # getpass turned echo off
    assert Users(tmp_path / "state" / "users.json").verify("carol", PASSWORD)
