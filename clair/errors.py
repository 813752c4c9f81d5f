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


class ClairError(Exception):
    """Base class. `str(err)` is the user-facing message."""


class ConfigError(ClairError):
    pass


class BadRequest(ClairError):
    pass


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
