"""What one client may ask for, checked before any GPU work: sizes, lengths, and how many jobs at once.

Everything a client sends is hostile until checked here. The checks run in the web handlers *and* at
the top of `Studio.chat()` / `Studio.render()`, before any lease, eviction or Ollama call, so a refused
request costs no GPU time whichever way it came in (UI, `/chat`, `/render`, a script).

* `plain_history()` rebuilds a chat history as plain text ([{role, content: str}]) and refuses anything
  else (files, components, numbers, nested structures): nothing of the client's structure survives.
* `check_chat()` / `check_prompt()` apply the length limits (settings in `clair.base.config`).
* `JobCounter` caps the GPU jobs (chats and renders, waiting or running) per user and for the house.
  It is a counter behind one lock; a slot is taken before the lease and given back in `finally`.

This module does not import gradio: the UI passes `who` (see `clair.adapters.ui.client_id`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from clair.base.config import Config
from clair.base.errors import BadRequest, GpuBusy

log = logging.getLogger("clair.service.limits")
ROLES = ("system", "user", "assistant")


def error_id() -> str:
    """A short id to tie what a user saw to the log line ("error id 3f9a2c")."""
    return uuid.uuid4().hex[:6]


def unexpected(log: logging.Logger, exc: BaseException, what: str = "request") -> str:
    """Log an unexpected exception with a fresh id; return the message the user sees (never the exception)."""
    eid = error_id()
    log.error("unexpected error in %s (error id %s)", what, eid, exc_info=exc)
    return f"Something went wrong inside Clair (error id {eid}). Please try again; if it persists, quote the id."


# -- text ----------------------------------------------------------------------------------------------
def _text_block(block: Any) -> str:
    """One content block of Gradio's normalised chat format: only {"type": "text", "text": str} is text."""
    if isinstance(block, str):
        return block
    if (
        isinstance(block, dict)
        and set(block) <= {"type", "text"}
        and block.get("type", "text") == "text"
        and isinstance(block.get("text"), str)
    ):
        return block["text"]
    raise BadRequest(
        "Clair's chat takes text only: this conversation holds something else (a file, an image or another "
        "component). Start a new conversation (New chat), or send history as [{role, content}] with string content."
    )


def plain_history(history: Sequence[Any] | None, cfg: Config) -> list[dict[str, str]]:
    """The history as fresh plain-text messages, within the limits. Raises BadRequest that says what to do."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise BadRequest("The chat history must be a list of {role, content} messages.")
    if len(history) > cfg.max_history_messages:
        raise BadRequest(
            f"The conversation is too long ({len(history)} messages; the limit is {cfg.max_history_messages}, "
            "CLAIR_MAX_HISTORY_MESSAGES). Start a new conversation (New chat), or send fewer past messages."
        )
    out: list[dict[str, str]] = []
    total = 0
    for item in history:
        if not isinstance(item, dict):
            raise BadRequest("Each chat history entry must be a {role, content} message.")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES and role != "tool":
            raise BadRequest(f"History entries need a role of system, user or assistant, not {str(role)[:40]!r}.")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(_text_block(b) for b in content)
        else:
            text = _text_block(content)
        total += len(text)
        if total > cfg.max_history_chars:
            raise BadRequest(
                f"The conversation is too long (over {cfg.max_history_chars} characters, CLAIR_MAX_HISTORY_CHARS). "
                "Start a new conversation (New chat), or send fewer past messages."
            )
        calls = tool_calls(item.get("tool_calls")) if role == "assistant" else []
        if role == "tool":  # a tool's result (the /v1 adapter's, for Ollama): kept even when empty
            name = item.get("tool_name")
            out.append({"role": "tool", "content": str(text), **({"tool_name": name} if isinstance(name, str) else {})})
        elif calls:
            out.append({"role": "assistant", "content": str(text), "tool_calls": calls})
        elif text.strip():
            out.append({"role": str(role), "content": str(text)})
    return out


def tool_calls(calls: Any) -> list[dict]:
    """An assistant's tool calls in Ollama's shape ([{function: {name, arguments: dict}}]), checked. BadRequest."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise BadRequest("An assistant's tool_calls must be a list.")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), dict):
            raise BadRequest("Each tool call needs a function with a name and an arguments object.")
        out.append({"function": {"name": fn["name"][:200], "arguments": fn["arguments"]}})
    return out


def _check_text(value: Any, what: str, limit: int, setting: str, advice: str) -> str:
    """A text field from the client: a string (None is empty) of at most `limit` characters, or BadRequest."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise BadRequest(f"The {what} must be text.")
    if len(value) > limit:
        raise BadRequest(
            f"The {what} is too long ({len(value)} characters; the limit is {limit}, {setting}). {advice}"
        )
    return value


def check_message(message: Any, cfg: Config, what: str = "message") -> str:
    return _check_text(
        message, what, cfg.max_message_chars, "CLAIR_MAX_MESSAGE_CHARS", "Shorten it, or split it over several messages."
    )


def check_model_name(model: Any) -> str | None:
    if model is None or model == "":
        return None
    # Ollama names have no spaces, but the in-process model's label does ("tiny (random weights)").
    if not isinstance(model, str) or len(model) > 200 or not model.isprintable():
        raise BadRequest("The model name is not valid: pick one from the list.")
    return model


def check_chat(
    cfg: Config, message: Any, history: Any, system: Any = None, model: Any = None, after_tool: bool = False
) -> tuple[str, list[dict[str, str]], str | None, str | None]:
    """(message, plain history, system, model), all checked. Raises BadRequest. `after_tool`: the history ends
    with a tool's result, which the model answers: no message then."""
    message = check_message(message, cfg)
    if not message.strip() and not after_tool:
        raise BadRequest("Type a message first.")
    if system is not None:
        system = check_message(system, cfg, "system prompt")
    return message, plain_history(history, cfg), system, check_model_name(model)


def check_prompt(prompt: Any, cfg: Config, what: str = "prompt") -> str:
    return _check_text(
        prompt,
        what,
        cfg.max_prompt_chars,
        "CLAIR_MAX_PROMPT_CHARS",
        "Shorten it: SDXL reads only about the first 77 tokens anyway.",
    )


def number(value: Any, name: str) -> float:
    """A number from the client (int, float or numeric string), or BadRequest. Never bool, dict, list."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"{name} must be a number.")
    try:
        x = float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number (got {str(value)[:20]!r}).") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise BadRequest(f"{name} must be a finite number.")
    return x


def largest_fitting(footprint: Callable[[int, int], tuple[int, int]], budget: int, w: int, h: int):
    """The largest (width, height) with the shape of w x h, multiples of 8, whose footprint fits `budget`.

    None if not even 64 x 64 fits.
    """
    best = None
    lo, hi = 0.0, 1.0  # scale factor on the longer side
    for _ in range(24):
        mid = (lo + hi) / 2
        cw, ch = _scaled(w, h, mid)
        if footprint(cw, ch)[0] <= budget:
            lo, best = mid, (cw, ch)
        else:
            hi = mid
    if best is None and footprint(64, 64)[0] <= budget:
        best = (64, 64)
    return best


def _scaled(w: int, h: int, f: float) -> tuple[int, int]:
    return max(64, int(w * f) // 8 * 8), max(64, int(h * f) // 8 * 8)


# -- caps on jobs ----------------------------------------------------------------------------------------
class JobCounter:
    """GPU jobs (waiting or running) per user and in all, behind one lock.

    Invariants, after every call: `total == sum(per_user.values())`, `total <= max_total`, and every
    per-user count is in 1..max_per_user (users with none are removed). A slot is taken before the
    request asks the arbiter for a lease and given back in `finally`, so an error, a cancel or a
    closed generator (the client went away) gives it back.
    """

    def __init__(self, max_per_user: int, max_total: int, eta_s: Callable[[], float] = lambda: 0.0):
        self.max_per_user = max_per_user
        self.max_total = max_total
        self.eta_s = eta_s
        self._lock = threading.Lock()
        self.per_user: dict[str, int] = {}
        self.total = 0
        self.refused = 0

    def try_take(self, who: str) -> str | None:
        """Take a slot for `who`; None when taken, else why not (which cap)."""
        with self._lock:
            if self.per_user.get(who, 0) >= self.max_per_user:
                which = "user"
            elif self.total >= self.max_total:
                which = "house"
            else:
                self.per_user[who] = self.per_user.get(who, 0) + 1
                self.total += 1
                return None
            self.refused += 1
            total = self.total
        log.info("job refused cap=%s who=%s total=%d", which, who, total)
        return which

    def would_refuse(self, who: str) -> str | None:
        """Which cap a new job from `who` would hit now (None: none), without taking a slot."""
        with self._lock:
            if self.per_user.get(who, 0) >= self.max_per_user:
                return "user"
            return "house" if self.total >= self.max_total else None

    def give_back(self, who: str) -> None:
        with self._lock:
            n = self.per_user.get(who, 0)
            if n <= 0:
                return
            if n == 1:
                del self.per_user[who]
            else:
                self.per_user[who] = n - 1
            self.total -= 1

    def busy_message(self, which: str) -> str:
        try:
            eta = max(1, round(self.eta_s()))
        except Exception:
            eta = 30
        if which == "user":
            return (
                f"Busy: you already have {self.max_per_user} requests waiting or running (the limit per person, "
                f"CLAIR_MAX_JOBS_PER_USER). Try again in about {eta} s, when one of them is done."
            )
        return (
            f"Busy: {self.max_total} requests are already waiting or running (CLAIR_MAX_QUEUE). "
            f"Try again in about {eta} s."
        )

    @contextlib.contextmanager
    def slot(self, who: str) -> Iterator[None]:
        """Hold one slot for `who` for the block; raises GpuBusy (with a retry time) past a cap."""
        which = self.try_take(who)
        if which is not None:
            raise GpuBusy(self.busy_message(which))
        try:
            yield
        finally:
            self.give_back(who)

    def snapshot(self) -> dict:
        with self._lock:
            return {"total": self.total, "per_user": dict(self.per_user), "refused": self.refused}
