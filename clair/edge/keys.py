"""API keys for the endpoints other programs use (/v1 and the Ollama-compatible port), and their commands.

`python app.py addkey NAME` makes a key, prints it once and stores only its SHA-256 hash in `keys.json`
beside the users file (CLAIR_USERS_FILE), written like the users file: a new file created with mode 0600,
then renamed over the old one. NAME is whom the key acts for: a request made with it counts as that user's
(in the logs, in the queue label, against per-user caps). `delkey NAME` revokes it, `keys` lists the names.

Keys are not passwords: each is 256 random bits (`secrets.token_urlsafe(32)`), so nobody can guess one and
a fast hash is enough (as for GitHub's or PyPI's tokens); a slow hash like the users' scrypt would cost
32 MiB and ~70 ms for every API call. A presented key is hashed and compared with every stored hash with
`hmac.compare_digest`, so the time taken does not depend on which key, or how much of one, matched.

A key is bound to its user's entry (`binding`): a new password (`adduser NAME` again) or a user deleted and
added again under the same name leaves the old key working for nobody, and `adduser` says so.

When a key is needed (clair/edge/web.py for /v1, clair/adapters/gateway.py for the Ollama port): whenever Clair has
users. Clair has no users only on loopback (or with --insecure, which opens everything), and then the
`Authorization` header is ignored: OpenAI clients always send some key ("ollama", "x").
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from clair.edge.users import KEYS_FILE, SecretsFile, UserError, check_name

log = logging.getLogger("clair.edge.keys")
PREFIX = "clair-"
MAX_KEY = 256  # longer Authorization values are refused before hashing


def keys_path(users_path: str | os.PathLike) -> Path:
    """keys.json in the folder of the users file."""
    return Path(users_path).with_name(KEYS_FILE)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_KEY:
        return None
    return value


def binding(stamp: str) -> str:
    """What a key records of its user: a digest of the user's entry as it was when the key was made (the
    password hash, which a new password or a deleted and re-added user changes)."""
    return hashlib.sha256(b"clair-key-binding\0" + stamp.encode("utf-8")).hexdigest()[:32]


class Keys:
    """The keys file, re-read whenever it changes on disk. Thread-safe.

    With `users` (clair.edge.users.Users), each key is bound to its user's entry: a key made before the user's
    password changed, or before the user was deleted and added again under the same name, is refused."""

    def __init__(self, path: str | os.PathLike, users=None):
        self.path = Path(path)
        self.users = users
        self._lock = threading.Lock()
        self._file = SecretsFile(self.path, "keys", "addkey", keep=lambda entry: isinstance(entry.get("sha256"), str))

    def _load(self) -> dict[str, dict]:
        return self._file.load()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._load())

    def entries(self) -> dict[str, dict]:
        with self._lock:
            return {name: dict(v) for name, v in self._load().items()}

    def verify(self, key: str | None) -> str | None:
        """The name a key belongs to, or None. Every stored hash is compared, each in constant time."""
        if not isinstance(key, str) or not key or len(key) > MAX_KEY:
            return None
        digest = _digest(key)
        with self._lock:
            entries = list(self._load().items())
        found = None
        for name, entry in entries:
            if hmac.compare_digest(entry["sha256"].encode("utf-8", "replace"), digest.encode()):
                found = name
        if found is not None and self.users is not None and self.users.names():
            stamp = self.users.stamp(found)
            bound = dict(entries)[found].get("user")
            if stamp is None or not isinstance(bound, str) or not hmac.compare_digest(bound, binding(stamp)):
                log.warning("api key of an earlier %s refused: their password changed or they were re-added", found)
                return None
        return found

    def _write(self, keys: dict[str, dict]) -> None:
        self._file.write(keys)

    def add(self, name: str) -> tuple[str, bool]:
        """Make a new key for `name` (replacing its old one). Returns (key, whether the name is new)."""
        check_name(name)
        key = PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            keys = dict(self._load())
            new = name not in keys
            keys[name] = {"sha256": _digest(key), "created": int(time.time()), "hint": key[: len(PREFIX) + 4]}
            stamp = self.users.stamp(name) if self.users is not None else None
            if stamp is not None:
                keys[name]["user"] = binding(stamp)
            self._write(keys)
        return key, new

    def delete(self, name: str) -> None:
        with self._lock:
            keys = dict(self._load())
            if name not in keys:
                raise UserError(f"There is no key named {name!r} in {self.path}.")
            del keys[name]
            self._write(keys)


COMMANDS = ("addkey", "delkey", "keys")


def command(argv: list[str], keys: Keys, out=None) -> int:
    """Run one key command; returns the exit status. The key is printed once, by addkey, and never logged."""
    out = sys.stdout if out is None else out
    cmd, args = argv[0], argv[1:]
    if cmd == "keys":
        if args:
            raise UserError("`keys` takes no arguments: it lists the key names.")
        entries = keys.entries()
        for name in sorted(entries):
            e = entries[name]
            made = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.get("created", 0)))
            print(f"{name}\t{e.get('hint', '?')}…\tcreated {made}", file=out)
        if not entries:
            print(f"No keys yet in {keys.path}: add one with `python app.py addkey NAME`.", file=sys.stderr)
        return 0
    if len(args) != 1:
        raise UserError(f"Usage: python app.py {cmd} NAME")
    name = check_name(args[0])
    if cmd == "delkey":
        keys.delete(name)
        print(f"Deleted the key {name} from {keys.path}. Requests made with it are refused from now on.", file=out)
        return 0
    key, new = keys.add(name)
    print(f"{'Added' if new else 'Replaced'} the key {name} in {keys.path}. It is shown only now; copy it:", file=out)
    print(key, file=out)
    print("Send it as `Authorization: Bearer <key>` (OpenAI clients: api_key=...).", file=out)
    return 0
