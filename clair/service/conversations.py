"""Past conversations, kept across restarts: one JSON file per conversation, one folder per user.

Layout: `<chats dir>/<owner folder>/<id>.json` (Config.chats_dir: chats/ beside the output folder, never
inside it, since Gradio serves the output folder). The owner folder is an HMAC of the user name under a
key of this install (`household` without user accounts), so no user name ever becomes a path and a name
cannot be confirmed from the folder names; folders are 0700 and files 0600 (clair.base.helpers.write_private); ids are made here
(`secrets.token_hex`), and an id a client sends is only used after it matches that exact form. A user can
only list, read or delete files in their own folder.

What is stored is plain text only: each message is rebuilt as {"role": "user"|"assistant", "content": str}
through the same checks as a chat's history (clair.service.limits.plain_history), so a file never holds what a
client sent as a structure. Limits: CLAIR_MAX_HISTORY_MESSAGES / _CHARS per conversation (the oldest
messages are dropped to fit), and at most `max_per_owner` conversations per user (the oldest go).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from clair.base.config import Config
from clair.base.errors import BadRequest
from clair.base.helpers import PRIVATE_DIR, private_dir, write_private
from clair.service import limits

log = logging.getLogger("clair.service.conversations")

_ID = re.compile(r"[0-9a-f]{16}")
TITLE_CHARS = 60


@dataclass(frozen=True)
class Summary:
    id: str
    title: str
    updated: float


def valid_id(value: object) -> str | None:
    """The id if it has the exact form this module makes, else None."""
    return value if isinstance(value, str) and _ID.fullmatch(value) else None


class ConversationStore:
    def __init__(self, cfg: Config, root: str | Path | None = None, max_per_owner: int = 100):
        self.cfg = cfg
        self.root = Path(root if root is not None else cfg.chats_dir).expanduser().resolve()
        self.max_per_owner = max_per_owner
        self._lock = threading.Lock()
        self._secret_lock = threading.Lock()
        self._key: bytes | None = None

    def _secret(self) -> bytes:
        """This install's folder-naming key (`.folder-key`, 0600), made on first use."""
        with self._secret_lock:
            if self._key is None:
                path = self.root / ".folder-key"
                try:
                    key = path.read_bytes()
                except FileNotFoundError:
                    key = b""
                if len(key) < 32:
                    key = secrets.token_bytes(32)
                    write_private(path, key)
                self._key = key
            return self._key

    def folder(self, owner: str | None) -> Path:
        """The owner's folder: an HMAC of the name under this install's key, so a name cannot be tested
        against folder names (a plain hash of a guessed name would match). The folder of the plain hash
        that earlier versions made is taken over on first use."""
        if owner is None:
            return self.root / "household"
        if not isinstance(owner, str) or not owner:
            raise BadRequest("Unknown user.")
        name = "user-" + hmac.new(self._secret(), owner.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
        path = self.root / name
        legacy = self.root / ("user-" + hashlib.sha256(owner.encode("utf-8")).hexdigest()[:32])
        if not path.exists() and legacy.is_dir() and not legacy.is_symlink():
            with contextlib.suppress(OSError):
                os.replace(legacy, path)
                os.chmod(path, PRIVATE_DIR)
        return path

    def _plain(self, messages: object) -> list[dict[str, str]]:
        """User and assistant turns as fresh strings, Clair's own notices left out, within the limits (the
        oldest messages go first). Raises BadRequest for anything that is not a plain-text message."""
        if not isinstance(messages, (list, tuple)):
            raise BadRequest("A conversation must be a list of {role, content} messages.")
        out: list[dict[str, str]] = []
        total = 0
        for item in reversed(messages):
            if len(out) >= self.cfg.max_history_messages:
                break
            if not isinstance(item, dict):
                raise BadRequest("Each message must be a {role, content} message.")
            role, content = item.get("role"), item.get("content")
            if role not in ("user", "assistant", "system"):
                raise BadRequest("Messages need a role of user or assistant.")
            if isinstance(content, list):
                text = "".join(limits._text_block(b) for b in content)
            else:
                text = limits._text_block("" if content is None else content)
            if role == "system" or not text.strip() or text.startswith(("⚠️", "⏳")):
                continue
            total += len(text)
            if total > self.cfg.max_history_chars:
                break
            out.append({"role": str(role), "content": str(text)})
        out.reverse()
        return out

    def save(self, owner: str | None, conv_id: str | None, messages: object) -> str | None:
        """Store the conversation (a new id when `conv_id` is None or not one of ours); returns its id, or
        None when there is nothing to keep. Raises BadRequest for a history that is not plain text."""
        plain = self._plain(messages)
        if not plain:
            return valid_id(conv_id)
        conv_id = valid_id(conv_id) or secrets.token_hex(8)
        first = next((m["content"] for m in plain if m["role"] == "user"), plain[0]["content"])
        title = " ".join(first.split())[:TITLE_CHARS] or "Conversation"
        record = {"id": conv_id, "title": title, "updated": time.time(), "messages": plain}
        folder = self.folder(owner)
        with self._lock:
            private_dir(self.root)
            write_private(folder / f"{conv_id}.json", json.dumps(record, ensure_ascii=False))
            self._prune(folder)
        return conv_id

    def _prune(self, folder: Path) -> None:
        files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[self.max_per_owner :]:
            old.unlink(missing_ok=True)

    def _read(self, owner: str | None, conv_id: object) -> dict | None:
        cid = valid_id(conv_id)
        if cid is None:
            return None
        path = self.folder(owner) / f"{cid}.json"
        try:
            if path.is_symlink() or not path.is_file():
                return None
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def load(self, owner: str | None, conv_id: object) -> list[dict[str, str]] | None:
        """The conversation's messages as fresh plain text, or None when this owner has no such conversation."""
        record = self._read(owner, conv_id)
        if record is None:
            return None
        try:
            return self._plain(record.get("messages"))
        except BadRequest:
            return None

    def list(self, owner: str | None) -> list[Summary]:
        """This owner's conversations, newest first."""
        folder = self.folder(owner)
        if not folder.is_dir():
            return []
        out = []
        for path in folder.glob("*.json"):
            record = self._read(owner, path.stem)
            if record is None:
                continue
            title, updated = record.get("title"), record.get("updated")
            out.append(
                Summary(
                    path.stem,
                    title[:TITLE_CHARS] if isinstance(title, str) else "Conversation",
                    float(updated) if isinstance(updated, (int, float)) else 0.0,
                )
            )
        out.sort(key=lambda s: s.updated, reverse=True)
        return out[: self.max_per_owner]

    def delete(self, owner: str | None, conv_id: object) -> bool:
        cid = valid_id(conv_id)
        if cid is None:
            return False
        try:
            (self.folder(owner) / f"{cid}.json").unlink()
            return True
        except OSError:
            return False
