"""Clair's settings, each declared once: name, default, description.

Every field of `Config` is one setting. Its environment variable is `CLAIR_<FIELD>` (except where
`env=` says otherwise, e.g. Ollama's own `OLLAMA_HOST`), and common ones also get a command-line
flag. The configuration table (docs/configuration.md) and `systemd/clair.env.example` are generated from this table
(`python -m clair.base.config --markdown` / `--env`), so they cannot drift from the code.

This module owns parsing and validation only; it must not import torch, gradio or the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clair.base.errors import ConfigError
from clair.base.helpers import go_duration_s

# Demo mode's output folder unless CLAIR_OUTPUT_DIR is set: noise images never mix with real ones.
DEMO_OUTPUT_DIR = os.path.join("outputs", "demo")

# A waiting GPU job is a future on the event loop, not a thread (clair/service/front.py, arbiter invariant 11):
# the queue may be as long as Ollama's own (OLLAMA_MAX_QUEUE, 512 by default).
MAX_QUEUE_CEILING = 512


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Sequence[str] = (),
    env: str = "",
    min: float | None = None,
    max: float | None = None,
):
    """Declare one setting: a dataclass field whose metadata carries its documentation.

    `min`/`max` bound a number (inclusive); `validate()` refuses anything outside, NaN and infinities included.
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices), "env": env, "min": min, "max": max}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    # --- serving -------------------------------------------------------------------------------
    host: str = setting(
        "127.0.0.1",
        "Address to serve on. Any address but loopback needs users (python app.py adduser NAME).",
        flag="--host",
    )
    port: int = setting(7860, "Port to serve on.", flag="--port", min=1, max=65535)
    listen: bool = setting(
        False, "Serve every interface (host 0.0.0.0), so the other machines on the LAN can open Clair.", flag="--listen"
    )
    insecure: bool = setting(
        False,
        "Allow serving a non-loopback address with no users, so anyone on the network can use Clair.",
        flag="--insecure",
    )
    users_file: str = setting(
        "",
        "The users file (python app.py adduser NAME). Empty: users.json beside the output folder.",
        flag="--users-file",
    )
    allowed_hosts: str = setting(
        "",
        "Extra host names clients may use to reach Clair (comma-separated), e.g. a reverse proxy's name. "
        "Loopback, this machine's name and its addresses are always allowed.",
    )
    trusted_proxies: str = setting(
        "",
        "Addresses of reverse proxies (comma-separated, e.g. 127.0.0.1) whose X-Forwarded-For names the client. "
        "Empty: nobody's is believed, so no client can pick its own address.",
    )
    session_hours: float = setting(
        12.0, "A login lasts this many hours; then the browser asks again.", min=0.0005, max=24 * 365
    )
    tls_cert: str = setting("", "TLS certificate file (PEM). With CLAIR_TLS_KEY, Clair serves https.")
    tls_key: str = setting("", "TLS private key file (PEM) for CLAIR_TLS_CERT.")
    max_connections: int = setting(
        256,
        "Most connections served at once (uvicorn limit_concurrency); past it new ones get 503. One address "
        "may hold a quarter of them. Keep it well under the service's LimitNOFILE.",
        min=8,
        max=65_536,
    )
    demo: bool = setting(
        False,
        "Demo mode: tiny random-weight models built in code, no GPU, network or services needed.",
        flag="--demo",
    )
    log_level: str = setting("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    # --- chat ----------------------------------------------------------------------------------
    chat_backend: str = setting(
        "auto",
        "Chat engine: ollama, local (a Hugging Face model in Clair's own process), or auto "
        "(Ollama when it answers, else local).",
        flag="--chat-backend",
        choices=("auto", "ollama", "local"),
    )
    chat_model: str = setting("llama3.1:8b", "Ollama model used for chat by default.", flag="--chat-model")
    local_chat_model: str = setting(
        "Qwen/Qwen2.5-0.5B-Instruct",
        "In-process chat model: hub id, local folder, or tiny (random weights, for demos and tests).",
        flag="--local-chat-model",
    )
    chat_num_ctx: int = setting(
        4096,
        "Context length sent as options.num_ctx with every chat. Pinned so Ollama does not size the "
        "KV cache from free VRAM and blow the budget.",
        min=256, max=1_048_576,
    )
    keep_alive: str = setting(
        "30m", "How long Ollama keeps the chat model loaded when idle: Go duration (30m, 1h) or seconds."
    )
    system_prompt: str = setting("You are a helpful assistant.", "Default system prompt for new chats.")
    max_new_tokens: int = setting(1024, "Longest reply, in tokens (options.num_predict for Ollama).", min=1, max=131_072)
    ollama_host: str = setting(
        "127.0.0.1:11434", "Where Ollama listens (Ollama's own variable, read the same way).", env="OLLAMA_HOST"
    )
    ollama_shares_gpu: str = setting(
        "auto",
        "Does Ollama use this machine's GPU? auto: yes when OLLAMA_HOST is this machine (its name, or any "
        "address of its network interfaces; the decision is logged at start-up). no: Ollama runs elsewhere, so "
        "Clair never evicts it and never holds chats back for a render.",
        choices=("auto", "yes", "no"),
    )
    ollama_port: int = setting(
        0,
        "Serve an Ollama-compatible API on this port, through Clair's GPU arbiter, for other programs "
        "(bound like Clair). 0 = off. 11434 once Ollama itself moved to a private port (docs/gateway.md).",
        min=0,
        max=65535,
    )
    ollama_timeout_s: float = setting(
        120.0, "Longest silence tolerated from Ollama while it loads or streams, in seconds.",
        min=1, max=86_400,
    )
    preload: bool = setting(
        True, "Load the models into host memory at start-up (not onto the GPU), so the first request is quick."
    )
    warmup: bool = setting(True, "Reload the chat model in the background after a render evicted it.")
    warmup_delay_s: float = setting(
        0.0, "Seconds to wait before that reload (it starts when the render's denoising ends); a render queued "
        "by then skips it.",
        min=0, max=3600,
    )

    # --- images --------------------------------------------------------------------------------
    image_keep_alive: str = setting(
        "10m",
        "How long the image model stays on the GPU after a render (like Ollama's keep_alive): Go duration "
        "(10m, 1h) or seconds; 0 unloads it right after each render, a negative value keeps it loaded. It "
        "goes back to host memory, so the next render only pays the copy back.",
    )
    image_model: str = setting(
        "SG161222/RealVisXL_V5.0",
        "SDXL checkpoint: hub id, local diffusers folder, or tiny (random weights).",
        flag="--image-model",
    )
    vae: str = setting(
        "auto",
        "SDXL VAE: auto (the fp16-safe madebyollin/sdxl-vae-fp16-fix when it is in the Hugging Face cache or can "
        "be downloaded, else the checkpoint's own), fp16-fix, stock (the checkpoint's own, decoded in fp32: "
        "more VRAM), or a hub id or local folder holding an SDXL VAE. See docs/facts.md.",
    )
    output_dir: str = setting(
        "outputs",
        "Where rendered PNGs are saved (with their parameters). In demo mode, unless set: outputs/demo, so noise "
        "images never mix with real ones.",
        flag="--output-dir",
    )
    state_dir: str = setting(
        "",
        "Where Clair keeps its state across restarts: users.json, saved conversations, clair-state.json "
        "(Ollama's measured model sizes). Empty: the folder that holds the output folder (never inside it: "
        "the outputs are served).",
    )
    gallery_size: int = setting(24, "How many recent images the gallery shows.", min=0, max=1000)

    # --- the GPU arbiter -----------------------------------------------------------------------
    gpu_policy: str = setting(
        "budget",
        "budget: unload only what must go to stay under the VRAM budget, so chat and images may share the GPU. "
        "exclusive: the chat model and the image model never share the GPU (one is unloaded before the other runs).",
        flag="--gpu-policy",
        choices=("budget", "exclusive"),
    )
    vram_budget_gb: float = setting(
        0.0,
        "VRAM ceiling Clair keeps to, in GB (GiB, as nvidia-smi counts). 0 = the card's total memory less the safety "
        "margin (CLAIR_VRAM_RESERVE_GB); without CUDA, 0 means unknown, so nothing is assumed to fit beside a render.",
        flag="--vram-budget-gb",
        min=0,
        max=4096,
    )
    vram_reserve_gb: float = setting(1.5, "Safety margin left free when the budget is derived from the device.", min=0, max=4096)
    pinned_offload: str = setting(
        "auto",
        "Keep a pinned host copy of in-process weights for fast swaps. auto checks free RAM first.",
        choices=("auto", "on", "off"),
    )
    sim_gpu_gb: float = setting(
        0.0,
        "Run on a simulated GPU card of this many GB (GiB) instead of CUDA: models take and give back memory on it "
        "as the real ones would, and it says out of memory as a real card does (docs/facts.md, \"The simulated "
        "card\"). 0: off (the demo uses 20 unless set). A comma-separated list (12,24) simulates several cards, "
        "one state file each (sim-gpu.json, sim-gpu-1.json, ...); with CLAIR_WORKERS=on Clair plans on every one "
        "(renders go where they fit), else it runs on the first.",
        min=0,
        max=4096,
    )
    # Every card's size when CLAIR_SIM_GPU_GB lists several (sim_gpu_gb is then the first). Not a setting of its
    # own: no variable, flag or table row (`fields()` lists settings only).
    sim_gpu_cards: tuple[float, ...] = field(default=(), metadata={"derived": True})
    sim_gpu_file: str = setting(
        "",
        "The simulated card's state file, shared by every process that uses the card. Empty: sim-gpu.json in "
        "the state folder.",
    )
    workers: str = setting(
        "off",
        "on: the image model runs in a worker process pinned to its card, so a CUDA fault or a hung kernel costs "
        "one render (the worker is killed and started again), not the service, and this process never "
        "initialises CUDA. off: in this process (no worker start-up: about 4 s on a CPU). See docs/design.md, "
        "\"Several cards and worker processes\".",
        choices=("off", "on"),
    )
    ollama_gpus: str = setting(
        "",
        "With several cards (CLAIR_WORKERS=on): the cards Ollama uses, comma-separated indices as Clair numbers "
        "them (0, 0,1). Clair evicts Ollama only for work placed on one of them. Empty: card 0.",
    )
    chat_priority: str = setting(
        "next",
        "next: a chat waits for at most the render in front of it. fifo: strict arrival order.",
        choices=("next", "fifo"),
    )
    preempt: str = setting(
        "always",
        "Pause a render at its next step for a chat, so the chat never waits for a whole render; the image "
        "comes out exactly the same. always (the default): every chat gets the GPU alone, and a render that "
        "meets a burst of chats pays for them (bounded: CLAIR_MAX_PREEMPTIONS, 60 s paused in all). auto: only "
        "when the chat does not fit beside the render; one that fits shares the GPU with it (both slower: "
        "docs/performance.md). off: chats wait for the render to finish.",
        choices=("auto", "off", "always"),
    )
    render_slice_s: float = setting(
        3.0,
        "A render may pause again only this many seconds after its last pause began (a chat that arrives "
        "later waits for the next step after that). Lower: chats wait less behind a render; higher: renders "
        "finish sooner under a stream of chats.",
        min=0,
        max=3600,
    )
    max_preemptions: int = setting(
        10,
        "A render pauses for chats at most this many times (and not again once it has been paused 60 s in "
        "all); after that, chats wait for it to finish.",
        min=0,
        max=100,
    )
    evict_timeout_s: float = setting(60.0, "How long to wait for Ollama to free the GPU before giving up.", min=1, max=3600)
    queue_timeout_s: float = setting(900.0, "How long a request may wait for the GPU before it is refused.", min=1, max=86_400)
    stall_s: float = setting(
        300.0,
        "Watchdog: a GPU holder that makes no progress (no denoising step, no token) for this many seconds makes "
        "/healthz fail, and systemd restarts Clair. Shorter heals a hung GPU sooner but risks restarting a slow "
        "step (a huge image on a slow card); it must exceed twice CLAIR_EVICT_TIMEOUT_S and CLAIR_OLLAMA_TIMEOUT_S. "
        "0 turns the check off.",
        min=0,
        max=86_400,
    )

    # --- limits: what one request may ask for, checked before any GPU work (UI and API alike) -----
    max_prompt_chars: int = setting(
        2000, "Longest image prompt, and longest negative prompt, in characters (SDXL reads ~77 tokens of it).", min=1, max=1000000)
    max_message_chars: int = setting(8000, "Longest chat message (and system prompt), in characters.", min=1, max=1000000)
    max_history_messages: int = setting(200, "Most messages a chat history sent with a message may hold.", min=1, max=100000)
    max_history_chars: int = setting(
        48000, "Most characters a chat history may hold in all (the model reads only CLAIR_CHAT_NUM_CTX tokens).", min=1, max=10000000)
    max_side: int = setting(2048, "Largest image width or height, in pixels (a multiple of 8; the smallest is 64).", min=64, max=8192)
    max_steps: int = setting(150, "Most denoising steps a render may ask for.", min=1, max=1000)
    min_guidance: float = setting(0.0, "Lowest guidance (CFG scale) a render may ask for.", min=0, max=100)
    max_guidance: float = setting(30.0, "Highest guidance (CFG scale) a render may ask for.", min=0, max=100)
    max_seed: int = setting(2**32 - 1, "Largest seed a render may ask for (seeds run from 0; -1 draws one at random).", min=0, max=2**63 - 1)
    max_jobs_per_user: int = setting(
        4,
        "GPU jobs (chats and renders, waiting or running) one user may have at once; per client address "
        "when there are no users. Past it, requests are refused with a retry time.", min=1, max=1000)
    max_queue: int = setting(
        16, "GPU jobs (chats and renders, waiting or running) the whole house may have at once; past it, refused.", min=1, max=MAX_QUEUE_CEILING)
    forwarded_users_from: str = setting(
        "",
        "API clients trusted to say which of their people a request is for, so each person gets their own "
        "CLAIR_MAX_JOBS_PER_USER: key names (comma-separated), or without users client addresses (e.g. 127.0.0.1). "
        "They name the person with Open WebUI's X-OpenWebUI-User-Id header (its ENABLE_FORWARD_USER_INFO_HEADERS"
        "=true); from anyone else the header is ignored. Empty: nobody (each key or address counts as one person).",
    )
    shared_gallery: bool = setting(
        False, "With user accounts, show everyone's images in every gallery (without users, all images are shown)."
    )

    # ------------------------------------------------------------------------------------------
    @property
    def state_folder(self) -> str:
        """CLAIR_STATE_DIR, else the folder beside the output folder: users.json, the saved conversations and
        clair-state.json live there (the demo's own output folder, outputs/demo, keeps the same one)."""
        if self.state_dir:
            return os.path.abspath(os.path.expanduser(self.state_dir))
        out = os.path.abspath(os.path.expanduser(self.output_dir))
        if self.demo and out == os.path.abspath(DEMO_OUTPUT_DIR):
            out = os.path.dirname(out)
        return os.path.dirname(out)

    @property
    def users_path(self) -> str:
        """The users file: CLAIR_USERS_FILE, else users.json beside the output folder."""
        if self.users_file:
            return os.path.abspath(os.path.expanduser(self.users_file))
        return os.path.join(self.state_folder, "users.json")

    @property
    def chats_dir(self) -> str:
        """Saved conversations (clair/service/conversations.py): chats/ beside the output folder; chats-demo/ in demo mode."""
        return os.path.join(self.state_folder, "chats-demo" if self.demo else "chats")

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    @property
    def keep_alive_value(self) -> str | int:
        """keep_alive as Ollama's API wants it: unit-less numbers become seconds (the API rejects "300")."""
        return parse_keep_alive(self.keep_alive)

    @property
    def ollama_url(self) -> str:
        return ollama_url(self.ollama_host)

    @property
    def sim_gpu_path(self) -> str:
        """The simulated card's state file (CLAIR_SIM_GPU_FILE, else sim-gpu.json in the state folder)."""
        if self.sim_gpu_file:
            return os.path.abspath(os.path.expanduser(self.sim_gpu_file))
        return os.path.join(self.state_folder, "sim-gpu.json")

    @property
    def sim_gpu_sizes(self) -> tuple[float, ...]:
        """The simulated cards' sizes in GiB, card 0 first (empty: no simulated card)."""
        if self.sim_gpu_cards:
            return self.sim_gpu_cards
        return (self.sim_gpu_gb,) if self.sim_gpu_gb > 0 else ()

    @property
    def state_path(self) -> str:
        return os.path.join(self.state_folder, "clair-state.json")

    @property
    def ollama_on_this_gpu(self) -> bool:
        return ollama_locality(self)[0]


def local_addresses() -> set[str]:
    """Every address of this machine's network interfaces (loopback, LAN, VPN), lower-case."""
    import psutil  # reads the interface table; no network traffic

    found = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                found.add(a.address.split("%", 1)[0].lower())  # drop an IPv6 zone (fe80::1%eth0)
    return found


def ollama_locality(cfg: Config) -> tuple[bool, str]:
    """Does Ollama use this machine's GPU, and why Clair thinks so (logged at start-up)."""
    if cfg.ollama_shares_gpu != "auto":
        yes = cfg.ollama_shares_gpu == "yes"
        return yes, f"CLAIR_OLLAMA_SHARES_GPU={cfg.ollama_shares_gpu}"
    host = cfg.ollama_url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]").split("%", 1)[0].lower()
    names = {"localhost", socket.gethostname().lower(), socket.gethostname().lower() + ".local"}
    if host in names or host.startswith("127.") or host in ("::1", "0.0.0.0", "::"):
        return True, f"OLLAMA_HOST {host} is this machine"
    try:
        mine = local_addresses()
    except Exception as exc:  # fail closed: a host we cannot place is treated as sharing our GPU
        return True, f"could not list this machine's addresses ({exc}); assuming {host} shares the GPU"
    if host in mine:
        return True, f"OLLAMA_HOST {host} is an address of this machine"
    return False, (
        f"OLLAMA_HOST {host} is not an address of this machine, so Ollama is taken to run elsewhere and is "
        "never evicted; set CLAIR_OLLAMA_SHARES_GPU=yes if it uses this GPU"
    )


def env_name(f: dataclasses.Field) -> str:
    return f.metadata["env"] or "CLAIR_" + f.name.upper()


def fields() -> tuple[dataclasses.Field, ...]:
    """The settings (a field derived from another, such as sim_gpu_cards, is none)."""
    return tuple(f for f in dataclasses.fields(Config) if not f.metadata.get("derived"))


def parse_sim_gpu_cards(raw: str) -> tuple[float, ...]:
    """CLAIR_SIM_GPU_GB as a list of card sizes ("12,24": two cards), with a message that says what to write."""
    sizes = []
    for part in raw.split(","):
        try:
            gb = float(part)
        except ValueError:
            gb = math.nan
        if not 0 < gb <= 4096:  # NaN fails too
            raise ConfigError(
                f"CLAIR_SIM_GPU_GB={raw!r}: each simulated card needs a size in GB from above 0 to 4096, "
                "comma-separated (12,24 is two cards), or a single 0 for none."
            )
        sizes.append(gb)
    return tuple(sizes)


def parse_keep_alive(value: str) -> str | int:
    value = value.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    try:
        go_duration_s(value)
    except ValueError:
        raise ConfigError(f"CLAIR_KEEP_ALIVE={value!r} is not a duration: use seconds (300) or a Go duration (30m, 1h).") from None
    return value


def duration_s(value: str, name: str = "CLAIR_IMAGE_KEEP_ALIVE") -> float:
    """A Go duration (10m, 1h30m) or a number of seconds, in seconds; negative means forever."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
        raise ConfigError(f"{name}={value!r} is not a duration: use seconds (600) or a Go duration (10m, 1h).")
    try:
        return go_duration_s(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a duration: use seconds (600) or a Go duration (10m, 1h).") from None


def ollama_url(host: str) -> str:
    """OLLAMA_HOST as Ollama's tools read it: scheme optional (http), port 11434 unless given.

    `http://host` without a port means port 80, as in Ollama's own client (docs/facts.md, "Ollama").
    """
    host = host.strip() or "127.0.0.1:11434"
    scheme, sep, rest = host.partition("://")
    if not sep:
        scheme, rest = "http", host
        default_port = 11434
    else:
        default_port = 443 if scheme == "https" else 80
    rest = rest.rstrip("/")
    hostpart, _, path = rest.partition("/")
    has_port = "]:" in hostpart if hostpart.startswith("[") else ":" in hostpart  # [IPv6]:port
    if not hostpart:
        hostpart = "127.0.0.1"
    if hostpart.startswith("0.0.0.0"):
        hostpart = hostpart.replace("0.0.0.0", "127.0.0.1", 1)  # a bind address, not a destination
    if not has_port:
        hostpart = f"{hostpart}:{default_port}"
    return f"{scheme}://{hostpart}" + (f"/{path}" if path else "")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


RETIRED = {
    "auth": "--auth/CLAIR_AUTH is retired: a password given there is visible to every local user (ps, the "
    "environment). Add users with `python app.py adduser NAME` (it asks for the password) and drop --auth.",
}


# CLAIR_ names that are not settings: the browser test's switch for rewriting the README's screenshots.
NOT_SETTINGS = frozenset({"CLAIR_UPDATE_SCREENSHOTS"})


def check_names(environ: Mapping[str, str]) -> None:
    """Refuse a CLAIR_ variable that is no setting, with the nearest real name: a misspelled name would
    otherwise be ignored silently and Clair would run with the default the person meant to change."""
    import difflib

    known = {env_name(f) for f in fields()}
    for name in sorted(environ):
        if name != name.upper() and name.upper().startswith("CLAIR_"):
            _refuse_case(name, known | NOT_SETTINGS)
        if not name.startswith("CLAIR_") or name in known or name in NOT_SETTINGS or name == "CLAIR_AUTH":
            continue
        if name[len("CLAIR_") :] in known:  # CLAIR_OLLAMA_HOST: a variable Clair reads under its own name
            guess = name[len("CLAIR_") :]
        else:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
            guess = close[0] if close else ""
        hint = f" Did you mean {guess}?" if guess else ""
        raise ConfigError(
            f"{name} is not one of Clair's settings.{hint} `clair --help` (or `python app.py --help`) lists "
            "them all; an unknown name is refused so that a typo cannot pass unnoticed."
        )


def _refuse_case(name: str, known: set[str]) -> None:
    """A CLAIR_ name in lower or mixed case (`clair_preempt`): environment names are case-sensitive (the
    shell, systemd's Environment= and EnvironmentFile=, Docker Compose), so Clair would never read it and
    would run on the default; refused, with the upper-case name it reads."""
    import difflib

    upper = name.upper()
    if upper == "CLAIR_AUTH":  # no setting, but a name Clair knows: say so, and what replaced it
        raise ConfigError(
            f"{name} is not one of Clair's settings: environment names are case-sensitive, so Clair would not read "
            f"it. You meant CLAIR_AUTH, and {RETIRED['auth']}"
        )
    if upper in known:
        guess = upper
    else:
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
        guess = close[0] if close else ""
    hint = f" Did you mean {guess}?" if guess else " Clair's settings are all upper-case CLAIR_ names."
    raise ConfigError(
        f"{name} is not one of Clair's settings: environment names are case-sensitive, and Clair reads upper-case "
        f"CLAIR_ names only.{hint} `clair --help` (or `python app.py --help`) lists them all."
    )


def _convert(f: dataclasses.Field, raw: str) -> Any:
    name = env_name(f)
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}.") from None
    value = raw.strip()
    choices = f.metadata["choices"]
    if choices:
        match = next((c for c in choices if c.lower() == value.lower()), None)
        if match is None:
            raise ConfigError(f"{name}={raw!r}: choose one of {', '.join(choices)}.")
        value = match
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clair" if os.path.basename(sys.argv[0]) == "clair" else "app.py",  # the installed command, or the checkout's
        description="Clair: chat and image generation sharing one GPU. Every option can also be set "
        "through its environment variable (shown in brackets). Accounts: `app.py adduser NAME` (asks for "
        "the password; one line on standard input for scripts), `app.py deluser NAME`, `app.py users`. API keys: "
        "`app.py addkey NAME` (prints a new key once), `app.py delkey NAME`, `app.py keys`.",
    )
    env_only = [f for f in fields() if not f.metadata["flag"]]
    p.epilog = "settings read from the environment only:\n" + "\n".join(
        f"  {env_name(f)} (default: {f.default!r}): {f.metadata['help']}" for f in env_only
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    for f in fields():
        flag = f.metadata["flag"]
        if not flag:
            continue
        shown = f.default if f.default != "" else "empty"
        # argparse %-formats help strings: a literal % must be doubled.
        help_text = f"{f.metadata['help']} [{env_name(f)}, default: {shown}]".replace("%", "%%")
        if f.type == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            choices = f.metadata["choices"] or None
            p.add_argument(flag, dest=f.name, default=None, choices=choices, help=help_text)
    return p


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, overridden by the environment, overridden by flags."""
    environ = os.environ if environ is None else environ
    argv = list(argv) if argv is not None else []
    if environ.get("CLAIR_AUTH") or any(a == "--auth" or a.startswith("--auth=") for a in argv):
        raise ConfigError(RETIRED["auth"])
    check_names(environ)
    values: dict[str, Any] = {}
    for f in fields():
        raw = environ.get(env_name(f))
        if f.name == "sim_gpu_gb" and raw and "," in raw:  # several simulated cards
            values["sim_gpu_cards"] = parse_sim_gpu_cards(raw)
            values["sim_gpu_gb"] = values["sim_gpu_cards"][0]
            continue
        if raw is not None and raw != "":
            values[f.name] = _convert(f, raw)
    args = parser().parse_args(argv)
    for f in fields():
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given if isinstance(given, bool) else _convert(f, str(given))
    cfg = Config(**values)
    if cfg.listen:
        if "host" in values and cfg.host not in ("0.0.0.0", "::"):
            raise ConfigError(
                f"--listen (CLAIR_LISTEN) serves every interface, but CLAIR_HOST={cfg.host} names one address: "
                "use one or the other (CLAIR_LISTEN=0 to serve only that address)."
            )
        cfg = dataclasses.replace(cfg, host="0.0.0.0")
    if cfg.demo:
        # Demo mode swaps in the tiny models unless the user named others explicitly.
        demo_values = {}
        if "image_model" not in values:
            demo_values["image_model"] = "tiny"
        if "local_chat_model" not in values:
            demo_values["local_chat_model"] = "tiny"
        if "output_dir" not in values:
            demo_values["output_dir"] = DEMO_OUTPUT_DIR
        if "sim_gpu_gb" not in values:
            demo_values["sim_gpu_gb"] = 20.0  # a real budget and real evictions on the panel
        cfg = dataclasses.replace(cfg, **demo_values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    parse_keep_alive(cfg.keep_alive)
    duration_s(cfg.image_keep_alive)
    if cfg.chat_num_ctx < 256:
        raise ConfigError(f"CLAIR_CHAT_NUM_CTX={cfg.chat_num_ctx} is too small: use at least 256 (4096 is typical).")
    if cfg.vram_budget_gb < 0:
        raise ConfigError("CLAIR_VRAM_BUDGET_GB must be 0 (automatic) or a positive number of GB.")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("CLAIR_TLS_CERT and CLAIR_TLS_KEY go together: set both (PEM files) or neither.")
    for name, path in (("CLAIR_TLS_CERT", cfg.tls_cert), ("CLAIR_TLS_KEY", cfg.tls_key)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{name}={path!r} is not a readable file: give the path of a PEM file.")
    if cfg.session_hours <= 0:
        raise ConfigError("CLAIR_SESSION_HOURS must be a positive number of hours (12 is typical).")
    if cfg.max_connections < 8:
        raise ConfigError("CLAIR_MAX_CONNECTIONS must be at least 8 (a browser tab holds a few).")
    if not 1 <= cfg.port <= 65535:
        raise ConfigError(f"CLAIR_PORT={cfg.port} is not a TCP port.")
    if cfg.ollama_port:
        if not 1 <= cfg.ollama_port <= 65535 or cfg.ollama_port == cfg.port:
            raise ConfigError(
                f"CLAIR_OLLAMA_PORT={cfg.ollama_port} must be a free TCP port other than CLAIR_PORT ({cfg.port}), or 0 (off)."
            )
        target = cfg.ollama_url.split("://", 1)[1].split("/", 1)[0]
        if cfg.ollama_on_this_gpu and target.rsplit(":", 1)[-1] == str(cfg.ollama_port):
            raise ConfigError(
                f"CLAIR_OLLAMA_PORT={cfg.ollama_port} is Ollama's own port (OLLAMA_HOST={cfg.ollama_host}): Clair would "
                "forward to itself. Move Ollama to a private port first and point OLLAMA_HOST there (docs/gateway.md)."
            )
    for name in ("max_prompt_chars", "max_message_chars", "max_history_messages", "max_history_chars", "max_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"CLAIR_{name.upper()} must be at least 1.")
    if cfg.max_side < 64 or cfg.max_side % 8:
        raise ConfigError(f"CLAIR_MAX_SIDE={cfg.max_side}: use a multiple of 8, at least 64 (2048 is typical).")
    if not 0 <= cfg.min_guidance <= cfg.max_guidance:
        raise ConfigError("CLAIR_MIN_GUIDANCE and CLAIR_MAX_GUIDANCE: need 0 <= min <= max (0 and 30 are typical).")
    if not 0 <= cfg.max_seed <= 2**63 - 1:
        raise ConfigError(f"CLAIR_MAX_SEED must be from 0 to {2**63 - 1}.")
    if cfg.max_queue < 1 or cfg.max_jobs_per_user < 1:
        raise ConfigError("CLAIR_MAX_QUEUE and CLAIR_MAX_JOBS_PER_USER must be at least 1.")
    if cfg.max_queue > MAX_QUEUE_CEILING:
        raise ConfigError(
            f"CLAIR_MAX_QUEUE={cfg.max_queue} is above {MAX_QUEUE_CEILING}, Ollama's own queue: use {MAX_QUEUE_CEILING} or less."
        )
    if not cfg.vae.strip():
        raise ConfigError("CLAIR_VAE is empty: use auto, fp16-fix, stock, a hub id or a local folder.")
    for f in fields():  # every number within its declared range: NaN and infinities fail every comparison
        lo, hi = f.metadata["min"], f.metadata["max"]
        value = getattr(cfg, f.name)
        if (lo is None and hi is None) or isinstance(value, bool):
            continue
        if not ((lo is None or value >= lo) and (hi is None or value <= hi)):
            span = f"from {lo:g} to {hi:g}" if lo is not None and hi is not None else f"at least {lo:g}" if lo is not None else f"at most {hi:g}"
            raise ConfigError(f"{env_name(f)}={value!r} is out of range: use a number {span}.")
    if cfg.stall_s and cfg.stall_s <= max(2 * cfg.evict_timeout_s, cfg.ollama_timeout_s):
        raise ConfigError(
            f"CLAIR_STALL_S={cfg.stall_s:g} is too short: a healthy eviction may take twice CLAIR_EVICT_TIMEOUT_S "
            f"({2 * cfg.evict_timeout_s:g} s) and Ollama may stay silent for CLAIR_OLLAMA_TIMEOUT_S "
            f"({cfg.ollama_timeout_s:g} s). Use more than both, or 0 to turn the check off."
        )


def env_example() -> str:
    lines = [
        "# Clair's settings (generated by `python -m clair.base.config --env`). Uncomment to change.",
        "# Installed as /etc/clair/clair.env for the systemd service.",
    ]
    for f in fields():
        lines += ["", f"# {f.metadata['help']}"]
        if f.metadata["choices"]:
            lines.append(f"# One of: {', '.join(f.metadata['choices'])}")
        default = f.default
        if isinstance(default, bool):
            default = "1" if default else "0"
        lines.append(f"#{env_name(f)}={default}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    rows = ["| variable | flag | default | what it does |", "|---|---|---|---|"]
    for f in fields():
        flag = f"`{f.metadata['flag']}`" if f.metadata["flag"] else ""
        default = f.default if f.default != "" else "(empty)"
        text = f.metadata["help"]
        if f.metadata["choices"]:
            text += f" One of: {', '.join(f.metadata['choices'])}."
        rows.append(f"| `{env_name(f)}` | {flag} | `{default}` | {text} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if "--env" in sys.argv:
        sys.stdout.write(env_example())
    else:
        sys.stdout.write(markdown_table())
