"""An Ollama server stand-in that speaks the real Ollama HTTP protocol.

No Ollama server can be installed on the test machines, so Clair's tests (and a person running the demo)
talk to this instead. It owns:

* the HTTP surface a chat app uses: ``GET /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``,
  ``POST /api/show``, ``POST /api/chat`` and ``POST /api/generate`` (NDJSON streaming, errors, status codes);
* a fake scheduler: loading takes ``load_delay`` seconds, ``keep_alive`` timers, deferred unloads,
  ``unload_delay`` seconds during which an unloading model is still listed by ``/api/ps``, LRU eviction
  beyond ``max_loaded_models`` and reloads when ``num_ctx`` changes;
* loaded sizes (``/api/ps`` ``size``) from its own table of figures users reported from real servers
  (``LOADED_SIZES``), never from Clair's formula, and partial offload (``size_vram < size``) when its fake
  VRAM is short;
* a simulated GPU card (``sim_card``: the JSON file of ``CLAIR_SIM_GPU_FILE``): each runner takes its
  ``size_vram`` on the card while loading (sized to the card's free memory, offloading the rest as Ollama
  does) and gives it back ``sim_release_lag`` seconds after it leaves ``/api/ps``, as a killed runner does;
* test hooks: a request log and a lifecycle event log, scripted replies, injected errors, gates that hold a
  request before its first token, ``/api/ps`` failing or hanging on demand (``fail_ps``, ``hang_ps``,
  ``ps_fail_every``), and ``wait_until`` for sleep-free assertions.

Behaviour follows ``docs/facts.md`` ("Ollama", with the original sources); comments cite it where Ollama does something surprising.
Standard library only, and nothing from ``clair``: the file also runs on its own::

    python tests/ollama_standin.py --port 11434 --model llama3.1:8b=4.9 --model qwen2.5:0.5b=0.4 \\
        --load-delay 1.5 --unload-delay 1.0 --token-delay 0.02

Thread-safety: one re-entrant lock, wrapped in ``self._cond`` (a ``threading.Condition``), protects
everything mutable: the installed-model table, the loaded-runner table, the logs and the test hooks. Every
change calls ``_changed()``, which bumps a generation counter and wakes all waiters (request threads waiting
for a load or a free slot, the housekeeping thread that runs timers, and ``wait_until``). No thread sleeps
or does I/O while holding the lock, except the optional ``echo`` printer used by the CLI and the simulated
card's small state file (written under its own ``flock``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

VERSION = "0.12.0-standin"

GB = 1_000_000_000  # on-disk sizes are decimal GB, as `ollama list` prints them
MIB = 1024 * 1024

REFERENCE_SIZE_GB = 4.9  # an 8B Q4_K_M on disk, for guessing a parameter count

# Loaded sizes (``/api/ps`` ``size``) come from this table of the stand-in's own, never from a formula of
# Clair's: per model, (bytes at context 0: weights + compute graph + Ollama's per-GPU floor, KV-cache bytes
# per token of context). The KV figure is the model's GGUF geometry: layers x KV heads x head dim x 2 (K and
# V) x 2 bytes (f16). The totals are what users pasted from `ollama ps` in Ollama's issue tracker:
#   llama3:8b Q4_0 (4.7 GB file) 5.4 GB at the 2k default (ollama/ollama#4531); llama3.1:8b Q4_0 6.5 GB at
#   ~4k (#10801); llama3.2:3b Q8_0 6.8 GB at 4k x 4 parallel and 9.6 GB at 8k x 4 (#8009); qwen2.5vl:7b
#   8.5 GB at 4k (#12261). A loaded model is always well above its file plus KV cache: `size` also counts
#   the compute graph and a per-GPU floor of ~457 MiB.
LOADED_SIZES: dict[str, tuple[int, int]] = {
    # 32 layers x 8 x 128 x 2 x 2 = 128 KiB/token; Q4_K_M (4.9 GB) at 4096 -> 6.2 GB, like its Q4_0 sibling
    "llama3.1:8b": (6_200_000_000 - 4096 * 131_072, 131_072),
    "llama3:8b": (5_400_000_000 - 2048 * 131_072, 131_072),  # #4531: 5.4 GB at 2048
    # 28 x 8 x 128 x 2 x 2 = 112 KiB/token; #8009: 6.8 GB at 16k tokens, 9.6 GB at 32k tokens (Q8_0)
    "llama3.2:3b": (6_800_000_000 - 16_384 * 114_688, 114_688),
    "qwen2.5:0.5b": (1_150_000_000, 12_288),  # 24 x 2 x 64 x 2 x 2; 0.4 GB file + graph + floor
    "gemma2:2b": (2_700_000_000, 106_496),  # 26 x 4 x 256 x 2 x 2; 1.6 GB file, large vocab graph
    "mistral:latest": (5_000_000_000, 131_072),  # 32 x 8 x 128 x 2 x 2; 4.1 GB file
    "phi4:latest": (10_300_000_000, 204_800),  # 40 x 10 x 128 x 2 x 2; 9.1 GB file
}

# The simulated GPU card's file protocol (docs/facts.md, "The simulated card"): {"total": bytes, "procs":
# {holder: bytes}, "oom": n}, read and written under fcntl.flock. Written again here, from the format, so this
# file stays free of Clair's code.
# A killed CUDA process's memory was back 0.1 s after SIGKILL (H200, 8 GiB).
SIM_RELEASE_LAG_S = 0.1
VRAM_RECOVERY_S = 5.0  # Ollama waits at most this long for an unloaded runner's VRAM (server/sched.go)


def sim_card_update(path: str, fn: Callable[[dict[str, Any]], Any]) -> Any:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            raw = f.read()
            state = json.loads(raw) if raw.strip() else {}
            state.setdefault("total", 0)
            state.setdefault("procs", {})
            state.setdefault("oom", 0)
            result = fn(state)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(state))
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return result


FOREVER = math.inf
# Ollama turns a negative keep_alive into time.Duration(math.MaxInt64) (~292.3 years), so /api/ps shows
# expires_at in the year 2318 (docs/facts.md, "keep_alive"). It is now + that duration, so
# from September 2026 on the year is 2319: compare with a threshold, not with 2318.
GO_MAX_DURATION_S = (2**63 - 1) / 1e9

RunnerState = Literal["loading", "ready", "unloading"]
EventKind = Literal["load_start", "loaded", "unload_requested", "unloading", "unloaded"]


# --------------------------------------------------------------------------------------------- durations


_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Seconds for a Go ``time.ParseDuration`` string ("5m", "1h30m", "-1.5h", "300ms", "0").

    Raises ``ValueError`` carrying Go's exact message, which Ollama returns verbatim as a 400 error.
    """
    original = text
    quoted = '"' + original + '"'
    negative = False
    if text[:1] in ("-", "+"):
        negative = text[0] == "-"
        text = text[1:]
    if text == "0":  # the only unit-less value Go accepts
        return 0.0
    if not text:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while text:
        if not (text[0] == "." or "0" <= text[0] <= "9"):
            raise ValueError(f"time: invalid duration {quoted}")
        number = re.match(r"([0-9]*)(?:\.([0-9]*))?", text)
        assert number is not None  # the pattern can match the empty string
        whole, fraction = number.group(1), number.group(2)
        if not whole and not fraction:  # "." or ".s"
            raise ValueError(f"time: invalid duration {quoted}")
        text = text[number.end() :]
        unit_len = 0
        while unit_len < len(text) and not (text[unit_len] == "." or "0" <= text[unit_len] <= "9"):
            unit_len += 1
        if unit_len == 0:
            raise ValueError(f"time: missing unit in duration {quoted}")
        unit, text = text[:unit_len], text[unit_len:]
        if unit not in _GO_UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration {quoted}')
        total += float(f"{whole or 0}.{fraction or 0}") * _GO_UNITS[unit]
    return -total if negative else total


def keep_alive_from_json(value: Any) -> float | None:
    """Seconds for a request's ``keep_alive`` as Ollama's ``api.Duration`` decodes it.

    ``None`` (omitted or JSON null) -> ``None``; negative -> ``FOREVER``; 0 -> unload when idle.
    JSON numbers are seconds and, as in Ollama's Go code (``int(t) * time.Second``), truncated to whole
    seconds, so 0.5 means 0. Strings must be Go durations: a unit-less "300" is rejected with
    ``time: missing unit in duration "300"`` (docs/facts.md, "keep_alive").
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        return FOREVER if value < 0 else float(int(value))
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return FOREVER if seconds < 0 else seconds
    go_type = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
    raise ValueError(f"Unsupported type: '{go_type}'")


def keep_alive_from_env(value: str | float) -> float:
    """Seconds for a server default given like ``OLLAMA_KEEP_ALIVE``.

    Unlike the request field, the env var also accepts a bare integer of seconds ("300")
    (docs/facts.md, "keep_alive").
    """
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        try:
            seconds = parse_go_duration(value)
        except ValueError:
            seconds = float(int(value))
    return FOREVER if seconds < 0 else seconds


def loaded_size_bytes(name: str, disk_bytes: int, context_length: int) -> int:
    """What ``/api/ps`` reports as ``size`` for ``name`` (``disk_bytes`` on disk) loaded with ``context_length``.

    From ``LOADED_SIZES``; a model not in the table gets a generous guess of its own: 1.2 x the file plus the
    ~457 MiB per-GPU floor, and 160 KiB of KV cache per token per 4.9 GB of file.
    """
    fixed, per_token = LOADED_SIZES.get(canonical_name(name), (0, 0))
    if not fixed:
        fixed = int(disk_bytes * 1.2 + 457 * MIB)
        per_token = int(160 * 1024 * disk_bytes / (REFERENCE_SIZE_GB * GB))
    return fixed + per_token * context_length


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=UTC).isoformat().replace("+00:00", "Z")


def _rfc3339_forever() -> str:
    return (datetime.now(UTC) + timedelta(seconds=GO_MAX_DURATION_S)).isoformat().replace("+00:00", "Z")


def canonical_name(name: str) -> str:
    """Ollama's name normalisation: a name without a tag means ``:latest``."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _guess_family(base: str) -> str:
    """ "llama3.1" -> "llama", "qwen2.5" -> "qwen": the leading letters of the name."""
    letters = re.match(r"[A-Za-z]+", base)
    return letters.group(0).lower() if letters else base


def split_tokens(text: str) -> list[str]:
    """Word tokens that join back to ``text``: "You said: hi" -> ["You", " said:", " hi"]."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


# ------------------------------------------------------------------------------------------------ records


class Event(NamedTuple):
    """A lifecycle event. Compares equal to a plain ``(kind, model, at)`` tuple.

    Kinds, in order for one runner: ``load_start`` (a load begins), ``loaded`` (ready to generate),
    ``unload_requested`` (keep_alive 0, timer expiry, eviction or a num_ctx change decided it must go; if a
    request is still using it, nothing more happens until that request ends), ``unloading`` (no request
    uses it any more: the runner is being killed, still listed by /api/ps) and ``unloaded`` (gone from
    /api/ps, ``unload_delay`` seconds after ``unloading``). ``at`` is ``time.time()``.
    """

    kind: EventKind
    model: str
    at: float


@dataclass
class RequestRecord:
    """One HTTP request as the stand-in saw it. Times are ``time.time()``."""

    method: str
    path: str  # without the query string
    arrived: float  # when the request line and headers had been read
    body: dict[str, Any] | None = None  # the parsed JSON object; None for GET or unparsable bodies
    status: int | None = None  # HTTP status sent (200 even when a stream later ends in an error line)
    finished: float | None = None  # when the last bytes of the response were about to be written
    error: str | None = None  # the error text sent, as an error body or a mid-stream error line
    lines: int = 0  # NDJSON lines written by a streaming response, the final and error lines included
    aborted: bool = False  # the client went away before the response was complete
    counts: tuple[int, int] | None = None  # (prompt_eval_count, eval_count) the final line reported
    tool_calls: list[dict[str, Any]] | None = None  # the tool calls the reply made (when `tools` were offered)
    # How long the request waited for a free parallel slot while the model's slots generated other replies
    # (Ollama answers OLLAMA_NUM_PARALLEL requests per model at a time; the rest wait in its queue, in order).
    slot_wait_s: float = 0.0

    @property
    def model(self) -> str | None:
        return (self.body or {}).get("model")

    @property
    def messages(self) -> list[dict[str, Any]] | None:
        return (self.body or {}).get("messages")

    @property
    def prompt(self) -> str | None:
        return (self.body or {}).get("prompt")

    @property
    def keep_alive(self) -> Any:
        """The raw JSON value (None when omitted)."""
        return (self.body or {}).get("keep_alive")

    @property
    def options(self) -> dict[str, Any]:
        return (self.body or {}).get("options") or {}

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrived


@dataclass
class InstalledModel:
    """A model as ``/api/tags`` lists it."""

    name: str  # canonical, with tag
    size: int  # bytes on disk
    digest: str
    modified_at: float
    family: str
    parameter_size: str
    quantization_level: str = "Q4_K_M"
    format: str = "gguf"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


@dataclass
class _Runner:
    """A loaded (or loading, or unloading) model: Ollama's runnerRef."""

    model: InstalledModel
    context_length: int
    size: int
    size_vram: int
    keep_alive: float  # seconds; FOREVER; 0 = unload as soon as no request uses it
    state: RunnerState
    ready_at: float  # monotonic deadline of the load
    last_used: float  # monotonic, for LRU eviction
    refs: int = 0  # requests holding it (Ollama's refCount); a runner with refs is never unloaded
    generating: int = 0  # requests past the parallel-slot wait (OLLAMA_NUM_PARALLEL)
    idle_deadline: float | None = None  # monotonic keep_alive expiry; None while used or kept forever
    unload_requested: bool = False
    expired_wall: float | None = None  # time.time() when it started unloading
    gone_at: float | None = None  # monotonic deadline of the unload


class Gate:
    """Holds the next chat/generate on a model after it has the model loaded, before its first token.

    The request counts as generating while held, so an unload requested meanwhile is deferred.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.reached = threading.Event()  # set when a request is waiting at the gate
        self.released = threading.Event()  # set by release() (or by stop())

    def release(self) -> None:
        self.released.set()

    def wait_reached(self, timeout: float = 5.0) -> None:
        if not self.reached.wait(timeout):
            raise TimeoutError(f"no request on {self.model} reached the gate within {timeout} s")


@dataclass
class _Failure:
    after_chunks: int
    error: str
    status: int | None  # None: a mid-stream error line under HTTP 200; else an HTTP error before streaming


ReplyFn = Callable[[dict[str, Any]], str | Sequence[str]]


class _Stopping(Exception):
    """Raised in request threads when the stand-in is stopped under them."""


def _client_gone(conn: socket.socket) -> bool:
    """Whether the client has closed its end of `conn` (a read would return end-of-file). Data waiting to be
    read (a kept-alive client's next request) is not gone."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# ------------------------------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], standin: OllamaStandin) -> None:
        super().__init__(address, _Handler)
        self.standin = standin


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the client's keep-alive pool works and streams use chunked encoding, as Ollama's do.
    protocol_version = "HTTP/1.1"
    server_version = "ollama-standin"
    # TCP_NODELAY, as Go's net/http sets on every connection Ollama accepts. With Nagle's algorithm on, a reply's
    # body (written after its headers) waited for the client's delayed ACK: ~40 ms added to every request.
    disable_nagle_algorithm = True
    server: _Server
    record: RequestRecord | None = None

    def setup(self) -> None:
        super().setup()
        self.server.standin._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._track_connection(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log replaces the default stderr access log

    def send_response(self, code: int, message: str | None = None) -> None:
        if self.record is not None:
            self.server.standin._update(self.record, status=code)
        super().send_response(code, message)

    def do_GET(self) -> None:
        self.server.standin._handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.standin._handle(self, "HEAD")

    def do_POST(self) -> None:
        self.server.standin._handle(self, "POST")

    def do_DELETE(self) -> None:
        self.server.standin._handle(self, "DELETE")

    # -- body and responses

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def mark_finished(self) -> None:
        # Stamped just before the last bytes go out, so a test that has the complete response in hand
        # always finds `finished` set.
        if self.record is not None and self.record.finished is None:
            self.server.standin._update(self.record, finished=time.time())

    def send_bytes(self, status: int, data: bytes, content_type: str, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.mark_finished()
        self.end_headers()
        if not head_only:
            self.wfile.write(data)
            self.wfile.flush()

    def send_json(self, status: int, obj: Any, head_only: bool = False) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json; charset=utf-8", head_only)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_line(self, obj: Any) -> None:
        data = (json.dumps(obj) + "\n").encode()
        if self.record is not None:  # counted before the client can see it
            self.server.standin._update(self.record, lines=self.record.lines + 1)
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self) -> None:
        self.mark_finished()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class OllamaStandin:
    """An in-process Ollama server. ``with OllamaStandin(...) as ollama:`` starts and stops it.

    All delays are seconds and may be changed while it runs (they are read when used).
    """

    def __init__(
        self,
        models: Mapping[str, float] | None = None,
        *,
        bind_host: str = "127.0.0.1",
        port: int = 0,
        load_delay: float = 0.0,
        unload_delay: float = 0.0,
        token_delay: float = 0.0,
        default_keep_alive: str | float = "5m",
        default_context_length: int = 4096,
        max_loaded_models: int = 3,
        num_parallel: int = 1,
        parallel_share: float = 1.0,
        vram_total_bytes: int | None = None,
        vram_used_elsewhere: int | Callable[[], int] = 0,
        offload_slowdown: float = 4.0,
        ps_blocks_during_unload: bool = False,
        reply: ReplyFn | None = None,
        echo: Callable[[str], None] | None = None,
        sim_card: str | None = None,
        sim_release_lag: float = SIM_RELEASE_LAG_S,
        no_tools: Iterable[str] = (),
    ) -> None:
        """
        models: name -> size on disk in GB (default ``{"llama3.1:8b": 4.9}``).
        port: 0 picks a free one (see ``.port`` / ``.url`` after ``start()``).
        load_delay: seconds a load takes. unload_delay: seconds an unloading model stays in /api/ps.
        token_delay: seconds before each streamed token.
        default_keep_alive: OLLAMA_KEEP_ALIVE for new loads that omit keep_alive ("5m", "1h", 300, -1).
        default_context_length: context of a load whose request has no options.num_ctx.
        max_loaded_models: loading one more evicts the least recently used idle model (0 means 3).
        num_parallel: requests one model generates at once; more wait their turn (OLLAMA_NUM_PARALLEL).
            As in Ollama, each slot has its own KV cache: a load's context is num_ctx x num_parallel, so its
            ``size`` (and what it takes on the simulated card) grows with it (docs/facts.md, "Ollama").
        parallel_share: how much the requests generating at once slow each other: each token takes
            ``token_delay x (1 + parallel_share x (n - 1))`` with n requests generating. 1.0 (the default)
            is the pessimistic end: the slots split one stream's speed (total tokens/s unchanged); a GPU that
            batches the slots well is nearer 0.
        vram_total_bytes / vram_used_elsewhere: None = unlimited VRAM. Otherwise a load gets
            ``size_vram = min(size, total - elsewhere - other runners' size_vram)``: Ollama does not refuse
            to load when VRAM is short, it silently offloads layers to CPU (docs/facts.md, "Ollama").
            ``vram_used_elsewhere`` may be a callable (e.g. a fake SDXL pipeline's footprint).
        offload_slowdown: token_delay multiplier for a partially offloaded model (slow chat, no error).
        ps_blocks_during_unload: newer servers block /api/ps while a runner unloads; True mimics them.
        reply: ``fn(request_body) -> str | list[str]`` for replies not queued with ``queue_reply``.
        echo: called with a line per lifecycle event and per finished request (the CLI prints them).
        sim_card: a simulated GPU card's state file; runners then take and give back memory on it (their
            ``size_vram`` is what the card has free, the rest offloaded), ``sim_release_lag`` s after unloading.
        no_tools: models whose template declares no tool calls (deepseek-r1, codellama ...): a chat that offers
            them ``tools`` gets Ollama's 400 "<registry name> does not support tools" before any load, as
            Ollama's ChatHandler checks a model's capabilities first (ollama/ollama issues 6027, 14795).
        """
        self.bind_host = bind_host
        self.port = port
        self.load_delay = load_delay
        self.unload_delay = unload_delay
        self.short_loads: list[dict] = []  # loads the simulated card was short for (partial offloads)
        self.token_delay = token_delay
        self.default_keep_alive = keep_alive_from_env(default_keep_alive)
        self.default_context_length = default_context_length
        self.max_loaded_models = max_loaded_models or 3
        self.num_parallel = max(1, num_parallel)
        self.parallel_share = max(0.0, parallel_share)
        self.vram_total_bytes = vram_total_bytes
        self.vram_used_elsewhere = vram_used_elsewhere
        self.offload_slowdown = offload_slowdown
        self.ps_blocks_during_unload = ps_blocks_during_unload
        self.reply_fn = reply
        self.echo = echo
        self.sim_card = sim_card
        self.sim_release_lag = sim_release_lag
        self.no_tools = {canonical_name(m) for m in no_tools}
        self._card_holders: dict[str, str] = {}  # model -> its runner's holder name on the card
        self._card_releases: list[tuple[float, str]] = []  # (monotonic deadline, holder)
        self._runner_seq = 0

        self._cond = threading.Condition(threading.RLock())
        self._generation = 0
        self._installed: dict[str, InstalledModel] = {}
        self._runners: dict[str, _Runner] = {}
        self._requests: list[RequestRecord] = []
        self._events: list[Event] = []
        self._gates: dict[str, deque[Gate]] = {}
        self._all_gates: list[Gate] = []
        self._failures: dict[str, deque[_Failure]] = {}
        self._ps_faults: deque[tuple[str, float]] = deque()  # ("fail", http status) / ("hang", seconds)
        self.ps_fail_every = 0  # fail every n-th /api/ps with 500 (0: never), for soak tests
        self._replies: dict[str | None, deque[str | Sequence[str]]] = {}
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

        for name, size_gb in (models if models is not None else {"llama3.1:8b": 4.9}).items():
            self.add_model(name, size_gb)

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> OllamaStandin:
        self._stopping.clear()
        self._server = _Server((self.bind_host, self.port), self)
        self.port = self._server.server_address[1]
        self._threads = [
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True),
            threading.Thread(target=self._housekeep, name="ollama-standin-timers", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._cond:
            for gate in self._all_gates:
                gate.release()
            self._changed()
        server.shutdown()
        # Wake handler threads parked on idle keep-alive connections so they exit now.
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        # A stopped server has no runners, as after `systemctl restart ollama`; start() again rebinds the
        # same port, so stop() + start() simulates a restart.
        with self._cond:
            self._runners.clear()
            # The runner processes are killed with the server: their memory goes back.
            for holder in [*self._card_holders.values(), *(h for _, h in self._card_releases)]:
                self._card_set(holder, 0)
            self._card_holders.clear()
            self._card_releases.clear()
            self._changed()

    def __enter__(self) -> OllamaStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL for ``ollama.Client(host=...)``, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self.bind_host}:{self.port}"

    @property
    def host(self) -> str:
        """Value for ``OLLAMA_HOST``, e.g. ``127.0.0.1:54321``."""
        return f"{self.bind_host}:{self.port}"

    # ----------------------------------------------------------------------------------- models and state

    def add_model(
        self,
        name: str,
        size_gb: float,
        *,
        family: str | None = None,
        parameter_size: str | None = None,
        quantization_level: str = "Q4_K_M",
    ) -> InstalledModel:
        """Install a model (as if pulled). ``size_gb`` is the size on disk in decimal GB."""
        full = canonical_name(name)
        base, _, tag = full.rpartition(":")
        base = base.rsplit("/", 1)[-1]
        if parameter_size is None:
            match = re.match(r"(\d+(?:\.\d+)?)([bm])", tag)
            params = float(match.group(1)) if match else size_gb / REFERENCE_SIZE_GB * 8
            parameter_size = f"{params:.1f}{match.group(2).upper() if match else 'B'}"
        model = InstalledModel(
            name=full,
            size=int(size_gb * GB),
            digest=hashlib.sha256(full.encode()).hexdigest(),
            modified_at=time.time(),
            family=family or _guess_family(base),
            parameter_size=parameter_size,
            quantization_level=quantization_level,
        )
        with self._cond:
            self._installed[full] = model
            self._changed()
        return model

    def loaded(self) -> list[str]:
        """Names /api/ps lists right now (loading and still-unloading models included)."""
        return [entry["name"] for entry in self.ps()]

    def state(self, model: str) -> RunnerState | None:
        """ "loading", "ready", "unloading", or None when not in /api/ps."""
        with self._cond:
            runner = self._runners.get(canonical_name(model))
            return None if runner is None else runner.state

    def ps(self) -> list[dict[str, Any]]:
        """The ``models`` list /api/ps would answer now."""
        with self._cond:
            now_wall = time.time()
            now = time.monotonic()
            entries = []
            for runner in self._runners.values():
                if runner.state == "unloading":
                    expires = runner.expired_wall or now_wall
                elif runner.refs == 0 and runner.state == "ready":
                    expires = math.inf if runner.idle_deadline is None else now_wall + runner.idle_deadline - now
                else:
                    expires = now_wall + runner.keep_alive
                model = runner.model
                entries.append(
                    {
                        "name": model.name,
                        "model": model.name,
                        "size": runner.size,
                        "digest": model.digest,
                        "details": model.details(),
                        "expires_at": _rfc3339_forever() if math.isinf(expires) else _rfc3339(expires),
                        "size_vram": runner.size_vram,
                        "context_length": runner.context_length,
                        "_sort": expires,
                    }
                )
        # Ollama lists the latest-expiring first (server/routes.go PsHandler).
        entries.sort(key=lambda entry: entry["_sort"], reverse=True)
        for entry in entries:
            del entry["_sort"]
        return entries

    # --------------------------------------------------------------------------------------- test hooks

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request so far, in arrival order."""
        with self._cond:
            return [replace(record) for record in self._requests]

    def requests_to(self, path: str, model: str | None = None) -> list[RequestRecord]:
        """Snapshot of the requests to ``path`` (e.g. "/api/chat"), optionally for one model."""
        return [
            record
            for record in self.requests
            if record.path == path
            and (model is None or (record.model and canonical_name(record.model) == canonical_name(model)))
        ]

    @property
    def events(self) -> list[Event]:
        """A snapshot of the lifecycle events so far, oldest first."""
        with self._cond:
            return list(self._events)

    def events_for(self, model: str) -> list[Event]:
        full = canonical_name(model)
        return [event for event in self.events if event.model == full]

    def reset_logs(self) -> None:
        with self._cond:
            self._requests.clear()
            self._events.clear()
            self._changed()

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
        """Return the predicate's first truthy value; raise ``TimeoutError`` after ``timeout`` seconds.

        Re-checks on every state change of the stand-in, and at least every ``interval`` seconds for
        predicates that look elsewhere (e.g. at the app under test). The predicate runs without the lock
        held, so it may call the stand-in over HTTP.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                seen = self._generation
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            with self._cond:
                if self._generation == seen:
                    self._cond.wait(min(remaining, interval))

    def hold(self, model: str) -> Gate:
        """Make the next chat/generate on ``model`` wait before its first token until ``gate.release()``.

        Gates queue: calling it twice holds the next two requests.
        """
        gate = Gate(canonical_name(model))
        with self._cond:
            self._gates.setdefault(gate.model, deque()).append(gate)
            self._all_gates.append(gate)
            if self._stopping.is_set():
                gate.release()
        return gate

    def fail_next(
        self,
        model: str,
        *,
        after_chunks: int = 0,
        error: str = "an error was encountered while running the model",
        status: int | None = None,
    ) -> None:
        """Make the next chat/generate on ``model`` fail.

        Default: stream ``after_chunks`` tokens, then end with a ``{"error": ...}`` line under HTTP 200 (the
        client raises ResponseError with status_code -1; a stream=false request gets HTTP 500). With
        ``status``: answer that HTTP status and ``{"error": ...}`` before any token.
        """
        with self._cond:
            self._failures.setdefault(canonical_name(model), deque()).append(_Failure(after_chunks, error, status))

    def fail_ps(self, times: int = 1, status: int = 500) -> None:
        """Make the next ``times`` ``/api/ps`` requests fail with HTTP ``status`` (a busy or broken server)."""
        with self._cond:
            self._ps_faults.extend([("fail", float(status))] * times)

    def hang_ps(self, times: int = 1, seconds: float = 30.0) -> None:
        """Make the next ``times`` ``/api/ps`` requests hang ``seconds`` before answering (``stop()`` ends the
        wait): newer servers block ``/api/ps`` while they unload (docs/facts.md, "Ollama")."""
        with self._cond:
            self._ps_faults.extend([("hang", float(seconds))] * times)

    def clear_ps_faults(self) -> None:
        with self._cond:
            self._ps_faults.clear()
            self.ps_fail_every = 0

    def queue_reply(self, reply: str | Sequence[str], model: str | None = None) -> None:
        """Script the next reply (on ``model``, or on any model). A string is split into word tokens; a
        list is streamed one element per chunk. Queued replies win over ``reply_fn`` and the default."""
        with self._cond:
            key = None if model is None else canonical_name(model)
            self._replies.setdefault(key, deque()).append(reply)

    # ---------------------------------------------------------------------------------------- internals

    def _changed(self) -> None:
        """Call with the lock held after any change."""
        self._generation += 1
        self._cond.notify_all()

    def _update(self, record: RequestRecord, **fields: Any) -> None:
        with self._cond:
            for key, value in fields.items():
                setattr(record, key, value)
            self._changed()

    def _event(self, kind: EventKind, model: str) -> None:
        self._events.append(Event(kind, model, time.time()))
        self._changed()
        if self.echo is not None:
            self.echo(f"[ollama-standin] {kind} {model}")

    def _check_stopping(self) -> None:
        if self._stopping.is_set():
            raise _Stopping

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self._stopping.wait(seconds):
            raise _Stopping

    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _vram_elsewhere(self) -> int:
        used = self.vram_used_elsewhere
        return int(used() if callable(used) else used)

    # -- scheduler (all with the lock held)

    def _new_runner(self, model: InstalledModel, context_length: int, keep_alive: float | None) -> _Runner:
        # Ollama gives each parallel slot its own context: "a 2K context with 4 parallel requests will result in
        # an 8K context and additional memory allocation" (docs/facts.md, "Ollama").
        size = loaded_size_bytes(model.name, model.size, context_length * self.num_parallel)
        size_vram = size
        if self.sim_card:
            # Ollama sizes a load to the free VRAM it sees and offloads the rest to the CPU.
            self._runner_seq += 1
            holder = f"ollama:{os.getpid()}:{self.port}-{self._runner_seq}:{model.name}"
            size_vram = self._card_take(holder, size)
            self._card_holders[model.name] = holder
            if size_vram < size:  # who held the card when this load found it short (for a test's message)
                procs = sim_card_update(self.sim_card, lambda state: dict(state["procs"]))
                self.short_loads.append({"model": model.name, "size": size, "got": size_vram, "procs": procs})
        elif self.vram_total_bytes is not None:
            in_use = sum(runner.size_vram for runner in self._runners.values())
            size_vram = max(0, min(size, self.vram_total_bytes - self._vram_elsewhere() - in_use))
        now = time.monotonic()
        runner = _Runner(
            model=model,
            context_length=context_length,
            size=size,
            size_vram=size_vram,
            # docs/facts.md ("Ollama"): an omitted keep_alive means the server default for a new load.
            keep_alive=self.default_keep_alive if keep_alive is None else keep_alive,
            state="loading",
            ready_at=now + self.load_delay,
            last_used=now,
        )
        self._runners[model.name] = runner
        self._event("load_start", model.name)
        return runner

    def _make_room(self) -> bool:
        """True if one more runner fits under max_loaded_models; else start evicting and return False."""
        runners = list(self._runners.values())
        if len(runners) < self.max_loaded_models:
            return True
        if any(runner.state == "unloading" for runner in runners):
            return False  # the memory is on its way back; wait for it rather than evict a second model
        idle = [runner for runner in runners if runner.refs == 0 and runner.state == "ready"]
        if idle:
            self._expire(min(idle, key=lambda runner: runner.last_used))
        return False

    def _expire(self, runner: _Runner) -> None:
        """Decide ``runner`` must go. It unloads now if no request uses it, else when the last one ends."""
        runner.keep_alive = 0.0
        if not runner.unload_requested:
            runner.unload_requested = True
            self._event("unload_requested", runner.model.name)
        if runner.refs == 0 and runner.state == "ready":
            runner.state = "unloading"
            runner.idle_deadline = None
            runner.expired_wall = time.time()
            # docs/facts.md ("Ollama"): until the runner process has exited (and Ollama has finished its
            # VRAM bookkeeping) the model stays listed by /api/ps.
            runner.gone_at = time.monotonic() + self.unload_delay
            self._event("unloading", runner.model.name)

    def _housekeep(self) -> None:
        """The timer thread: finishes loads, expires keep_alive timers, finishes unloads."""
        with self._cond:
            while not self._stopping.is_set():
                now = time.monotonic()
                deadlines: list[float] = []
                for runner in list(self._runners.values()):
                    if runner.state == "loading":
                        if now >= runner.ready_at:
                            runner.state = "ready"
                            self._event("loaded", runner.model.name)
                        else:
                            deadlines.append(runner.ready_at)
                    if runner.state == "ready" and runner.refs == 0 and runner.idle_deadline is not None:
                        if now >= runner.idle_deadline:
                            self._expire(runner)
                        else:
                            deadlines.append(runner.idle_deadline)
                    if runner.state == "unloading":
                        assert runner.gone_at is not None
                        if now >= runner.gone_at:
                            del self._runners[runner.model.name]
                            self._event("unloaded", runner.model.name)
                            holder = self._card_holders.pop(runner.model.name, None)
                            if holder is not None:  # out of /api/ps; the process's memory follows a little later
                                self._card_releases.append((now + self.sim_release_lag, holder))
                        else:
                            deadlines.append(runner.gone_at)
                for deadline, holder in list(self._card_releases):
                    if now >= deadline:
                        self._card_releases.remove((deadline, holder))
                        self._card_set(holder, 0)
                        self._changed()
                    else:
                        deadlines.append(deadline)
                self._cond.wait(max(0.0, min(deadlines) - now) if deadlines else None)

    def _card_take(self, holder: str, nbytes: int) -> int:
        """Take up to `nbytes` on the simulated card; returns what was taken (the card's free memory at most)."""
        assert self.sim_card is not None

        def fn(state: dict[str, Any]) -> int:
            free = int(state["total"]) - sum(int(v) for k, v in state["procs"].items() if k != holder)
            got = max(0, min(nbytes, free))
            state["procs"][holder] = got
            return got

        return sim_card_update(self.sim_card, fn)

    def _card_set(self, holder: str, nbytes: int) -> None:
        if self.sim_card:
            sim_card_update(self.sim_card, lambda state: state["procs"].pop(holder, None))

    def _acquire(
        self, model: InstalledModel, context_length: int, keep_alive: float | None, conn: socket.socket | None = None
    ) -> tuple[_Runner, int]:
        """Get a ready runner for ``model`` with a reference held; returns it and the load time in ns.

        A request whose client (`conn`) has gone by the time its model would start loading loads nothing
        (ConnectionResetError): Ollama skips a cancelled pending request, and one it was making room for (it
        unloaded another model first, server/sched.go processPending) fails in `llama.Load(req.ctx, ...)`. The
        model it unloaded to make room stays unloaded, as in Ollama."""
        started = time.monotonic()
        waited = False
        with self._cond:
            while True:
                self._check_stopping()
                runner = self._runners.get(model.name)
                recovering = self._card_releases and time.monotonic() - started < VRAM_RECOVERY_S
                if runner is None and recovering:
                    # Ollama's scheduler loads nothing new until a runner it unloaded has given its VRAM back
                    # (server/sched.go, waitForVRAMRecovery: polls every 250 ms, up to 5 s), else the load
                    # would size itself to memory that is about to come back and offload layers to the CPU.
                    self._cond.wait(0.05)
                    continue
                if runner is None:
                    if self._make_room():
                        if conn is not None and _client_gone(conn):
                            raise ConnectionResetError("the client left before its model began loading")
                        runner = self._new_runner(model, context_length, keep_alive)
                        break
                elif runner.state == "unloading":
                    pass  # a fresh load starts once the old runner is gone
                elif runner.context_length != context_length:
                    # Ollama's scheduler reloads a model whose runner options differ (sched.go needsReload),
                    # so a request without num_ctx reloads a model loaded with a custom num_ctx.
                    self._expire(runner)
                else:
                    # docs/facts.md ("Ollama"): an omitted keep_alive keeps the loaded model's duration.
                    if keep_alive is not None:
                        runner.keep_alive = keep_alive
                        runner.unload_requested = runner.unload_requested and keep_alive == 0
                    break
                waited = True
                self._cond.wait()
            runner.refs += 1
            runner.idle_deadline = None
            runner.last_used = time.monotonic()
            self._changed()
            while runner.state == "loading":
                waited = True
                self._check_stopping()
                self._cond.wait()
        return runner, int((time.monotonic() - started) * 1e9) if waited else 0

    def _release(self, runner: _Runner) -> None:
        with self._cond:
            runner.refs -= 1
            runner.last_used = time.monotonic()
            if runner.refs == 0 and runner.state == "ready":
                if runner.keep_alive == 0:
                    self._expire(runner)
                elif not math.isinf(runner.keep_alive):
                    runner.idle_deadline = runner.last_used + runner.keep_alive
            self._changed()

    def _request_unload(self, model: InstalledModel) -> None:
        """keep_alive 0 with nothing to generate. A model that is not loaded is fine: 200 "unload" anyway."""
        with self._cond:
            runner = self._runners.get(model.name)
            if runner is not None and runner.state != "unloading":
                self._expire(runner)

    def _pop(self, table: Mapping[Any, deque[Any]], key: Any) -> Any:
        queue = table.get(key)
        return queue.popleft() if queue else None

    # -- HTTP

    def _handle(self, handler: _Handler, method: str) -> None:
        path = urlsplit(handler.path).path
        record = RequestRecord(method=method, path=path, arrived=time.time())
        handler.record = record
        with self._cond:
            self._requests.append(record)
            self._changed()
        try:
            self._route(handler, record, method, path)
        except _Stopping:
            handler.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self._update(record, aborted=True)
            handler.close_connection = True
        finally:
            if record.finished is None:  # no complete response was sent (aborted, stopping)
                self._update(record, finished=time.time())
            if self.echo is not None:
                self.echo(
                    f"[ollama-standin] {method} {path}{' ' + record.model if record.model else ''} -> {record.status} "
                    f"({record.finished - record.arrived:.2f} s){' ' + record.error if record.error else ''}"
                )

    def _route(self, handler: _Handler, record: RequestRecord, method: str, path: str) -> None:
        if path == "/" and method in ("GET", "HEAD"):
            handler.send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8", head_only=method == "HEAD")
        elif path == "/api/version" and method in ("GET", "HEAD"):
            handler.send_json(200, {"version": VERSION}, head_only=method == "HEAD")
        elif path == "/api/tags" and method in ("GET", "HEAD"):
            with self._cond:
                installed = list(self._installed.values())
            handler.send_json(
                200,
                {
                    "models": [
                        {
                            "name": model.name,
                            "model": model.name,
                            "modified_at": _rfc3339(model.modified_at),
                            "size": model.size,
                            "digest": model.digest,
                            "details": model.details(),
                        }
                        for model in installed
                    ]
                },
                head_only=method == "HEAD",
            )
        elif path == "/api/ps" and method == "GET":
            with self._cond:
                fault = self._ps_faults.popleft() if self._ps_faults else None
                self._ps_count = getattr(self, "_ps_count", 0) + 1
                if fault is None and self.ps_fail_every and self._ps_count % self.ps_fail_every == 0:
                    fault = ("fail", 500.0)
            if fault is not None and fault[0] == "hang":
                self._pause(fault[1])
            elif fault is not None:
                return self._fail(handler, record, int(fault[1]), "ps: server busy (injected failure)")
            if self.ps_blocks_during_unload:
                with self._cond:
                    while any(runner.state == "unloading" for runner in self._runners.values()):
                        self._check_stopping()
                        self._cond.wait()
            handler.send_json(200, {"models": self.ps()})
        elif path == "/api/show" and method == "POST":
            self._serve_show(handler, record)
        elif path in ("/api/chat", "/api/generate") and method == "POST":
            self._serve_generation(handler, record, "chat" if path == "/api/chat" else "generate")
        elif path == "/v1/models" and method == "GET":
            with self._cond:
                installed = list(self._installed.values())
            data = [{"id": m.name, "object": "model", "created": int(m.modified_at), "owned_by": "library"} for m in installed]
            handler.send_json(200, {"object": "list", "data": data})
        elif path == "/v1/chat/completions" and method == "POST":
            self._serve_openai_chat(handler, record)
        else:
            handler.send_bytes(404, b"404 page not found", "text/plain")  # what Go's router answers

    def _serve_openai_chat(self, handler: _Handler, record: RequestRecord) -> None:
        """``POST /v1/chat/completions``, not streamed: Ollama's OpenAI-compatible chat (its docs/openai.md).
        Loads the model like /api/chat; the answer carries ``usage`` (prompt and reply token counts). The
        body is recorded as sent, so a test can see what reached Ollama (``tools`` included)."""
        try:
            body = json.loads(handler.read_body() or b"null")
        except ValueError as exc:
            return handler.send_json(400, {"error": {"message": f"invalid JSON: {exc}", "type": "invalid_request_error"}})
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return handler.send_json(400, {"error": {"message": "model is required", "type": "invalid_request_error"}})
        self._update(record, body=body)
        name = body["model"]
        with self._cond:
            model = self._installed.get(canonical_name(name))
        if model is None:
            return handler.send_json(404, {"error": {"message": f"model '{name}' not found", "type": "api_error"}})
        if body.get("tools") and model.name in self.no_tools:
            error = {"message": self.tools_unsupported(model.name), "type": "api_error", "param": None, "code": None}
            return handler.send_json(400, {"error": error})
        runner, _ = self._acquire(model, self.default_context_length, None, handler.connection)
        try:
            with self._cond:
                gate: Gate | None = self._pop(self._gates, model.name)  # hold() holds this chat too
            if gate is not None:
                gate.reached.set()
                with self._cond:
                    self._changed()
                gate.released.wait()
                self._check_stopping()
            tokens = self._reply_tokens("chat", body, None, self.reply_fn)
            for _ in tokens:
                self._pause(self.token_delay)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
            handler.send_json(200, {
                "id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                          "total_tokens": prompt_tokens + len(tokens)},
            })
        finally:
            self._release(runner)

    def _serve_show(self, handler: _Handler, record: RequestRecord) -> None:
        """``POST /api/show``: a model's details; ``model`` (or the older ``name``) names it."""
        try:
            body = json.loads(handler.read_body() or b"null")
        except ValueError as exc:
            return self._fail(handler, record, 400, f"invalid JSON: {exc}")
        if not isinstance(body, dict):
            return self._fail(handler, record, 400, "json: cannot unmarshal into Go value of type api.ShowRequest")
        self._update(record, body=body)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name.strip():
            return self._fail(handler, record, 400, "model is required")
        with self._cond:
            model = self._installed.get(canonical_name(name))
        if model is None:
            return self._fail(handler, record, 404, f"model '{name}' not found")
        handler.send_json(
            200,
            {
                "license": "",
                "modelfile": f"# Modelfile generated by the stand-in\nFROM {model.name}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": model.details(),
                "model_info": {"general.architecture": model.family, "general.parameter_count": 0},
                "capabilities": ["completion"] if model.name in self.no_tools else ["completion", "tools"],
                "modified_at": _rfc3339(model.modified_at),
            },
        )

    @staticmethod
    def tools_unsupported(name: str) -> str:
        """Ollama's words for a chat offering tools to a model without them: the model's full registry name."""
        path = name if "/" in name.split(":", 1)[0] else f"library/{name}"
        return f"registry.ollama.ai/{path} does not support tools"

    def _fail(self, handler: _Handler, record: RequestRecord, status: int, message: str) -> None:
        self._update(record, error=message)
        handler.send_json(status, {"error": message})

    def _serve_generation(self, handler: _Handler, record: RequestRecord, kind: Literal["chat", "generate"]) -> None:
        started = time.monotonic()
        raw = handler.read_body()
        # Validation order follows Ollama's handlers: decode the body (keep_alive is decoded with it), then
        # the model name, then the model lookup; all before any scheduling (docs/facts.md, "Ollama").
        if not raw.strip():
            return self._fail(handler, record, 400, "missing request body")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return self._fail(handler, record, 400, f"invalid JSON: {exc}")
        if not isinstance(body, dict):
            go_kind = "array" if isinstance(body, list) else type(body).__name__
            api_type = "ChatRequest" if kind == "chat" else "GenerateRequest"
            return self._fail(
                handler, record, 400, f"json: cannot unmarshal {go_kind} into Go value of type api.{api_type}"
            )
        self._update(record, body=body)
        try:
            keep_alive = keep_alive_from_json(body.get("keep_alive"))
        except ValueError as exc:
            return self._fail(handler, record, 400, str(exc))
        name = body.get("model")
        if not isinstance(name, str) or not name.strip():
            return self._fail(handler, record, 400, "model is required")
        with self._cond:
            model = self._installed.get(canonical_name(name))
        if model is None:
            return self._fail(handler, record, 404, f"model '{name}' not found")
        if kind == "chat" and body.get("tools") and model.name in self.no_tools:
            return self._fail(handler, record, 400, self.tools_unsupported(model.name))
        options = body.get("options") or {}
        if not isinstance(options, dict):
            return self._fail(handler, record, 400, "json: cannot unmarshal options")
        context_length = int(options.get("num_ctx") or self.default_context_length)
        stream = body.get("stream")
        stream = True if stream is None else bool(stream)  # the server's default is to stream
        empty = not body.get("messages") if kind == "chat" else not body.get("prompt")

        if empty and keep_alive == 0:
            # Answered at once: the memory is freed later (docs/facts.md, "Unloading: the answer comes before the memory is free").
            self._request_unload(model)
            return handler.send_json(200, self._done_object(kind, name, "unload"))
        runner, load_ns = self._acquire(model, context_length, keep_alive, handler.connection)
        try:
            if empty:
                return handler.send_json(200, self._done_object(kind, name, "load"))
            self._generate(handler, record, kind, body, name, runner, load_ns, stream, options, started)
        finally:
            self._release(runner)

    def _done_object(self, kind: str, name: str, reason: str) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": name, "created_at": _rfc3339(time.time())}
        if kind == "chat":
            obj["message"] = {"role": "assistant", "content": ""}
        else:
            obj["response"] = ""
        obj.update(done=True, done_reason=reason)
        return obj

    def _reply_tokens(self, kind: str, body: dict[str, Any], scripted: Any, reply_fn: ReplyFn | None) -> list[str]:
        if scripted is not None:
            reply = scripted
        elif reply_fn is not None:
            reply = reply_fn(body)
        elif kind == "chat" and (body.get("messages") or [{}])[-1].get("role") == "tool":
            reply = f"Tool said: {body['messages'][-1].get('content') or ''}"
        else:
            reply = f"You said: {self._last_user_text(kind, body)}"
        return split_tokens(reply) if isinstance(reply, str) else [str(token) for token in reply]

    @staticmethod
    def _last_user_text(kind: str, body: dict[str, Any]) -> str:
        if kind == "generate":
            return str(body.get("prompt") or "")
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content") or "")
        return ""

    # What a tool call costs in reply tokens: a fixed figure of the stand-in's own (a real model's call is
    # a few dozen tokens of JSON).
    tool_call_tokens = 17

    @staticmethod
    def _tool_calls(body: dict[str, Any]) -> list[dict[str, Any]]:
        """With `tools` offered and a user's message last, the stand-in calls the first tool, every required
        parameter given the user's text; after a tool's result it answers in text ("Tool said: ...")."""
        tools = body.get("tools") or []
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        if not tools or not messages or messages[-1].get("role") != "user":
            return []
        fn = tools[0].get("function") or {}
        required = (fn.get("parameters") or {}).get("required") or []
        text = str(messages[-1].get("content") or "")
        return [{"function": {"name": fn.get("name"), "arguments": {p: text for p in required}}}]

    @staticmethod
    def _prompt_eval_count(kind: str, body: dict[str, Any]) -> int:
        # Whitespace words, not real tokenisation: deterministic and good enough for a stand-in.
        if kind == "generate":
            texts = [str(body.get("prompt") or "")]
        else:
            texts = [str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict)]
        return max(1, sum(len(text.split()) for text in texts))

    def _generate(
        self,
        handler: _Handler,
        record: RequestRecord,
        kind: Literal["chat", "generate"],
        body: dict[str, Any],
        name: str,
        runner: _Runner,
        load_ns: int,
        stream: bool,
        options: dict[str, Any],
        started: float,
    ) -> None:
        prompt_started = time.monotonic()
        with self._cond:
            while runner.generating >= self.num_parallel:
                self._check_stopping()
                self._cond.wait()
            runner.generating += 1
            record.slot_wait_s = time.monotonic() - prompt_started
            key = runner.model.name
            gate: Gate | None = self._pop(self._gates, key)
            failure: _Failure | None = self._pop(self._failures, key)
            scripted = self._pop(self._replies, key)
            if scripted is None:
                scripted = self._pop(self._replies, None)
            reply_fn = self.reply_fn
            slowdown = self.offload_slowdown if runner.size_vram < runner.size else 1.0
            self._changed()
        try:
            if gate is not None:
                gate.reached.set()
                with self._cond:
                    self._changed()  # let wait_until see the request parked at the gate
                gate.released.wait()
                self._check_stopping()
            tokens = self._reply_tokens(kind, body, scripted, reply_fn)
            done_reason = "stop"
            num_predict = options.get("num_predict")
            # Reaching num_predict ends with "length" even if the reply would have ended there: the model
            # never got to emit its end-of-sequence token.
            if isinstance(num_predict, int) and num_predict > 0 and len(tokens) >= num_predict:
                tokens, done_reason = tokens[:num_predict], "length"
            if failure is not None and failure.status is not None:
                return self._fail(handler, record, failure.status, failure.error)

            calls = self._tool_calls(body) if kind == "chat" else []
            if calls:  # a model that calls a tool writes the call, not text (Ollama sends it in one chunk)
                tokens, done_reason = [], "stop"
            if stream:
                handler.start_stream()
            eval_started = time.monotonic()
            sent: list[str] = []
            for index, token in enumerate(tokens):
                if failure is not None and index >= failure.after_chunks:
                    break
                # The slots generating now share the model's compute (see parallel_share). The pace is read at
                # each token, as a GPU's is: a render that starts or stops beside a reply changes its next token.
                token_delay = self.token_delay * slowdown
                self._pause(token_delay * (1 + self.parallel_share * max(0, runner.generating - 1)))
                if stream:
                    handler.send_line(self._chunk(kind, name, token))
                sent.append(token)
            if failure is not None:
                self._update(record, error=failure.error)
                if not stream:
                    return handler.send_json(500, {"error": failure.error})
                # docs/facts.md, "Protocol details": an error after streaming began keeps HTTP 200 and
                # ends the stream with an error line; the client raises ResponseError(status_code=-1).
                handler.send_line({"error": failure.error})
                return handler.end_stream()

            if calls:
                call_chunk = self._chunk(kind, name, "")
                call_chunk["message"]["tool_calls"] = calls
                if stream:
                    handler.send_line(call_chunk)
                sent.append(json.dumps(calls))  # counted as the reply's tokens below
            now = time.monotonic()
            final = self._chunk(kind, name, "" if stream else "".join(sent[: len(sent) - bool(calls)]))
            if calls and not stream:
                final["message"]["tool_calls"] = calls
            eval_count = len(sent) + (self.tool_call_tokens - 1 if calls else 0)
            prompt_count = self._prompt_eval_count(kind, body)
            self._update(record, counts=(prompt_count, eval_count), tool_calls=calls or None)
            final.update(
                done=True,
                done_reason=done_reason,
                total_duration=max(1, int((now - started) * 1e9)),
                load_duration=load_ns,
                prompt_eval_count=prompt_count,
                prompt_eval_duration=max(1, int((eval_started - prompt_started) * 1e9)),
                eval_count=eval_count,
                eval_duration=max(1, int((now - eval_started) * 1e9)),
            )
            if stream:
                handler.send_line(final)
                handler.end_stream()
            else:
                handler.send_json(200, final)
        finally:
            with self._cond:
                runner.generating -= 1
                self._changed()

    @staticmethod
    def _chunk(kind: str, name: str, text: str) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": name, "created_at": _rfc3339(time.time())}
        if kind == "chat":
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj["done"] = False
        return obj


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_model(text: str) -> tuple[str, float]:
    name, sep, size = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE_GB, got {text!r}")
    try:
        return name, float(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be a number of GB, got {size!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Ollama server stand-in (no GPU): speaks Ollama's HTTP API with fake models, "
        "realistic load/unload timing and streaming. See docs/facts.md, section Ollama."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11434, help="port (default 11434; 0 picks a free one)")
    parser.add_argument(
        "--model",
        type=_parse_model,
        action="append",
        metavar="NAME=GB",
        help="an installed model and its size on disk in GB; repeatable (default llama3.1:8b=4.9)",
    )
    parser.add_argument("--load-delay", type=float, default=1.5, help="seconds a load takes")
    parser.add_argument("--unload-delay", type=float, default=1.0, help="seconds an unload stays in /api/ps")
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds per streamed token")
    parser.add_argument(
        "--keep-alive",
        default=os.environ.get("OLLAMA_KEEP_ALIVE") or "5m",
        help="default keep_alive for new loads (default $OLLAMA_KEEP_ALIVE or 5m)",
    )
    parser.add_argument("--context-length", type=int, default=4096, help="default num_ctx (default 4096)")
    parser.add_argument("--max-loaded-models", type=int, default=3)
    parser.add_argument("--num-parallel", type=int, default=1, help="OLLAMA_NUM_PARALLEL (default 1)")
    parser.add_argument(
        "--parallel-share", type=float, default=1.0, help="how much parallel requests slow each other (0-1, default 1)"
    )
    parser.add_argument("--vram-gb", type=float, default=None, help="fake VRAM size; short VRAM -> partial offload")
    parser.add_argument("--sim-card", default=None, help="a simulated GPU card's state file (CLAIR_SIM_GPU_FILE)")
    parser.add_argument("--quiet", action="store_true", help="do not log requests and events to stderr")
    args = parser.parse_args(argv)

    models = dict(args.model) if args.model else {"llama3.1:8b": 4.9}
    standin = OllamaStandin(
        models,
        bind_host=args.host,
        port=args.port,
        load_delay=args.load_delay,
        unload_delay=args.unload_delay,
        token_delay=args.token_delay,
        default_keep_alive=args.keep_alive,
        default_context_length=args.context_length,
        max_loaded_models=args.max_loaded_models,
        num_parallel=args.num_parallel,
        parallel_share=args.parallel_share,
        vram_total_bytes=None if args.vram_gb is None else int(args.vram_gb * GB),
        sim_card=args.sim_card,
        echo=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
    )
    done = threading.Event()
    # Explicit SIGINT too: a job started with `&` from a script inherits SIGINT ignored.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    standin.start()
    print(f"ollama stand-in listening on {standin.url} (models: {', '.join(models)})", flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "FOREVER",
    "VERSION",
    "Event",
    "Gate",
    "InstalledModel",
    "OllamaStandin",
    "RequestRecord",
    "canonical_name",
    "keep_alive_from_env",
    "keep_alive_from_json",
    "loaded_size_bytes",
    "main",
    "parse_go_duration",
    "split_tokens",
]
