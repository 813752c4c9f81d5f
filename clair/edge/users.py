"""Clair's users: a small JSON file of salted scrypt hashes, and the `adduser`/`deluser`/`users` commands.

The file (`CLAIR_USERS_FILE`, by default `users.json` beside the output folder) maps each name to its
own scrypt parameters, salt and hash; no password is ever stored, printed or logged. It is written
atomically (a new file created with mode 0600, then renamed over the old one), so a crash never leaves
half a file and the hashes are never readable by other local users, not even for an instant.

Checking a password costs the same whether the name exists or not: an unknown name is checked against
a dummy hash made with the same parameters, and hashes are compared with `hmac.compare_digest`. The
running server re-reads the file when it changes, so `adduser` takes effect without a restart.

The scrypt parameters (n=2**15, r=8, p=1: 32 MiB and about 70 ms a check on one core) follow the
Python docs (`hashlib.scrypt`) and RFC 7914; OWASP's password storage cheat sheet recommends at least
n=2**17 with r=8, p=1 for servers with memory to spare. Clair shares its box with two models and its
login is rate limited per address (clair/edge/web.py), so it keeps to 2**15. Each entry stores its own
parameters, so they can be raised later without invalidating existing users.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import threading
from pathlib import Path

from clair.base.helpers import write_private

SCRYPT = {"n": 2**15, "r": 8, "p": 1}
DKLEN = 32
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class UserError(Exception):
    """A user command that cannot be done; the message says what to do instead."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=DKLEN, maxmem=256 * n * r * p + (1 << 20)
    )


def make_entry(password: str) -> dict:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, **SCRYPT)
    return {"scheme": "scrypt", **SCRYPT, "salt": _b64(salt), "hash": _b64(digest)}


def check_entry(entry: dict, password: str) -> bool:
    try:
        n, r, p = int(entry["n"]), int(entry["r"]), int(entry["p"])
        if entry.get("scheme") != "scrypt" or not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        salt = base64.b64decode(entry["salt"])
        expected = base64.b64decode(entry["hash"])
    except (KeyError, TypeError, ValueError):
        return False
    return hmac.compare_digest(_scrypt(password[:MAX_PASSWORD], salt, n, r, p), expected)


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise UserError(
            f"{name!r} is not a usable user name: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit."
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"The password is too short: use at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"The password is too long: use at most {MAX_PASSWORD} characters.")
    return password



class SecretsFile:
    """A small JSON file of hashes, `{"version": 1, <section>: {name: entry}}`: the users file and the keys
    file (clair/edge/keys.py). Re-read whenever it changes on disk, so the running server sees `adduser` and
    `addkey` without a restart; written atomically with mode 0600 (created so, never chmod-ed after), in a
    folder made 0700. The caller holds its own lock around `load()` and `write()`."""

    def __init__(self, path: Path, section: str, command: str, keep=lambda entry: True):
        self.path = path
        self.section = section  # "users" or "keys"
        self.command = command  # what re-creates an entry, for the error message
        self.keep = keep  # entries that fail it are ignored
        self._stamp: tuple | None = None
        self._entries: dict[str, dict] = {}

    def load(self) -> dict[str, dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, {}
            return self._entries
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                entries = data.get(self.section, {}) if isinstance(data, dict) else {}
                if not isinstance(entries, dict):
                    raise ValueError(f"{self.section} is not a mapping")
            except (OSError, ValueError) as exc:
                raise UserError(
                    f"The {self.section} file {self.path} cannot be read ({exc.__class__.__name__}): fix or remove "
                    f"it, then add {self.section} again with `python app.py {self.command} NAME`."
                ) from None
            self._entries = {
                k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, dict) and self.keep(v)
            }
            self._stamp = stamp
        return self._entries

    def write(self, entries: dict[str, dict]) -> None:
        text = json.dumps({"version": 1, self.section: entries}, indent=1, sort_keys=True) + "\n"
        write_private(self.path, text)


class Users:
    """The users file, re-read whenever it changes on disk. Thread-safe."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = SecretsFile(self.path, "users", "adduser")
        self._dummy: dict | None = None

    # --- reading -------------------------------------------------------------------------------
    def _load(self) -> dict[str, dict]:
        return self._file.load()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._load())

    def __bool__(self) -> bool:
        return bool(self.names())

    def stamp(self, name: str) -> str | None:
        """What a session remembers of its user: the current password hash (None: no such user). A new
        password, or deleting the user, changes it, and the sessions opened before end (clair/edge/web.py)."""
        with self._lock:
            entry = self._load().get(name) if isinstance(name, str) else None
        return str(entry.get("hash")) if entry is not None else None

    def verify(self, name: str, password: str) -> bool:
        """True when `password` is `name`'s. Unknown names cost as much as known ones."""
        with self._lock:
            entry = self._load().get(name) if isinstance(name, str) else None
            if self._dummy is None:
                self._dummy = make_entry(secrets.token_urlsafe(16))
            dummy = self._dummy
        if not isinstance(password, str):
            password = ""
        ok = check_entry(entry if entry is not None else dummy, password)
        return ok and entry is not None

    # --- writing -------------------------------------------------------------------------------
    def _write(self, users: dict[str, dict]) -> None:
        self._file.write(users)

    def set_password(self, name: str, password: str) -> bool:
        """Create or change a user. Returns True when the user is new."""
        check_name(name)
        check_password(password)
        entry = make_entry(password)
        with self._lock:
            users = dict(self._load())
            new = name not in users
            users[name] = entry
            self._write(users)
        return new

    def delete(self, name: str) -> None:
        with self._lock:
            users = dict(self._load())
            if name not in users:
                raise UserError(f"There is no user {name!r} in {self.path}.")
            del users[name]
            self._write(users)


KEYS_FILE = "keys.json"  # clair/edge/keys.py's file, beside the users file


def revoke_key(users: Users, name: str) -> bool:
    """Remove `name`'s API key (clair/edge/keys.py) from the keys file beside the users file; True if it had one.
    A key is bound to its user's entry, so after a new password it works for nobody: this keeps the
    `keys` listing honest. (Users cannot import clair.edge.keys: keys build on users.)"""
    keys = SecretsFile(users.path.with_name(KEYS_FILE), "keys", "addkey")
    with users._lock:
        entries = dict(keys.load())
        if name not in entries:
            return False
        del entries[name]
        keys.write(entries)
    return True


# --- the commands (python app.py adduser / deluser / users) --------------------------------------


def read_password(stdin=None, prompt=getpass.getpass) -> str:
    """Twice from a terminal (they must match), or the first line of standard input for scripts."""
    stdin = sys.stdin if stdin is None else stdin
    if stdin.isatty():
        first = prompt("New password: ")
        if prompt("Repeat it: ") != first:
            raise UserError("The two passwords differ: nothing was changed. Try again.")
        return first
    line = stdin.readline()
    if not line:
        raise UserError("No password on standard input: pipe one line, e.g. `printf '%s\\n' \"$PW\" | ...`.")
    return line.rstrip("\r\n")


COMMANDS = ("adduser", "deluser", "users")


def command(argv: list[str], users: Users, out=None, stdin=None, prompt=getpass.getpass) -> int:
    """Run one user command; returns the exit status. Never prints a password or a hash."""
    out = sys.stdout if out is None else out
    cmd, args = argv[0], argv[1:]
    if cmd == "users":
        if args:
            raise UserError("`users` takes no arguments: it lists the user names.")
        names = users.names()
        for name in names:
            print(name, file=out)
        if not names:
            print(f"No users yet in {users.path}: add one with `python app.py adduser NAME`.", file=sys.stderr)
        return 0
    if len(args) != 1:
        raise UserError(f"Usage: python app.py {cmd} NAME")
    name = check_name(args[0])
    if cmd == "deluser":
        users.delete(name)
        print(f"Deleted user {name} from {users.path}. Their open sessions end at once.", file=out)
        return 0
    password = check_password(read_password(stdin, prompt))
    new = users.set_password(name, password)
    print(f"{'Added' if new else 'Changed the password of'} user {name} in {users.path}.", file=out)
    if revoke_key(users, name):
        print(
            f"Revoked {name}'s API key: it belonged to the {'earlier user of that name' if new else 'old password'}. "
            f"Make a new one with `python app.py addkey {name}`.",
            file=out,
        )
    if not new:
        print("Their open sessions end at once.", file=out)
    return 0
