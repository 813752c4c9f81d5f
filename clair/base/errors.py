"""Clair's exceptions. Every message is written for the person at the browser: what happened and what to do.

    ClairError
    ├── ConfigError            a setting has a bad value (raised at start-up)
    ├── BadRequest             the request itself is invalid (prompt empty, size not a multiple of 8, ...)
    ├── ChatUnavailable        the chat engine cannot answer (Ollama down, model not pulled, ...)
    ├── ImageModelUnavailable  the image checkpoint cannot be loaded
    ├── GpuBusy                the request waited longer than CLAIR_QUEUE_TIMEOUT_S for the GPU
    ├── EvictionFailed         a tenant did not leave the GPU in time; the request that needed it is refused
    └── Cancelled              the user (or a disconnected client) stopped the request

The UI converts these to `gr.Error` at its edge; nothing else reaches the browser, and no stack trace does.
"""

from __future__ import annotations

_OFFLINE_HINTS = ("not fully cached", "offline mode", "couldn't connect", "cannot reach", "connection error")


def load_failure(what: str, model: str, exc: BaseException, setting: str) -> str:
    """A model that could not be loaded, said for a person: the likely cause and what to do."""
    text = " ".join(str(exc).split())
    if any(hint in text.lower() for hint in _OFFLINE_HINTS):
        return (
            f"The {what} {model} is not downloaded yet, and the Hugging Face hub cannot be reached to fetch it. "
            f"Connect this machine to the internet for the first run, or set {setting} to a local model folder "
            "(or run with --demo)."
        )
    if len(text) > 240:
        text = text[:240].rsplit(" ", 1)[0] + " …"
    text = text.rstrip(".") or type(exc).__name__
    sep = " " if text.endswith("…") else ". "
    return f"Could not load the {what} {model}: {text}{sep}Check {setting} (a hub id, a local folder, or `tiny`)."


def expected_load_failure(exc: BaseException) -> bool:
    """A load failure that is a known condition (offline, a missing folder or file), not a bug: its traceback
    belongs at DEBUG, the explanation at WARNING."""
    if isinstance(exc, (FileNotFoundError, ClairError)):
        return True
    text = " ".join(str(exc).split()).lower()
    return any(hint in text for hint in (*_OFFLINE_HINTS, "couldn't connect", "not a valid model identifier"))


class ClairError(Exception):
    """Base class. `str(err)` is the user-facing message."""


class ConfigError(ClairError):
    pass


class BadRequest(ClairError):
    pass


class ToolsUnsupported(BadRequest):
    """A chat offered `tools` to a model that cannot call them (Ollama: 400 "<model> does not support tools").
    The request, not the engine, is at fault: a 400 to an API client, never a 503 it would retry."""


class ChatUnavailable(ClairError):
    pass


class ImageModelUnavailable(ClairError):
    pass


class GpuBusy(ClairError):
    pass


class EvictionFailed(ClairError):
    pass


class Cancelled(ClairError):
    pass
