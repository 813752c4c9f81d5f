"""PyTorch's CUDA allocator setting, applied before torch first touches CUDA.

Clair asks for `expandable_segments:True` unless the user set an allocator configuration of their own
(`PYTORCH_CUDA_ALLOC_CONF`, or `PYTORCH_ALLOC_CONF`, the name PyTorch 2.9+ also reads). With the default
caching allocator an SDXL render *reserves* far more than it allocates (15.5 GiB reserved for 11.5 GiB
allocated at 1024² with the stock VAE), and reserved memory is what another process, Ollama, cannot use.
Expandable segments let the allocator grow one mapping instead of caching many fixed-size blocks, which
PyTorch documents as the remedy for that fragmentation. Why, and the sources: docs/facts.md, "The CUDA
allocator". The allocator reads its configuration once, when CUDA is first used, so this must run
before that, in the process itself (a running process cannot change it).

No torch import here: this module runs first.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
DEFAULT = "expandable_segments:True"


def apply(environ: MutableMapping[str, str] | None = None) -> tuple[str, str]:
    """Set Clair's default unless the user has their own. Returns (variable, value) in force."""
    environ = os.environ if environ is None else environ
    for name in VARS:
        if environ.get(name, "").strip():
            return name, environ[name]
    environ[VARS[0]] = DEFAULT
    return VARS[0], DEFAULT
