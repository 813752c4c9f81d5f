"""Clair's settings, each declared once: name, default, description.

Every field of `Config` is one setting. Its environment variable is `CLAIR_<FIELD>` (except where
`env=` says otherwise, e.g. Ollama's own `OLLAMA_HOST`), and common ones also get a command-line
flag. The README's configuration table and `systemd/clair.env.example` are generated from this table
(`python -m clair.config --markdown` / `--env`), so they cannot drift from the code.

This module owns parsing and validation only; it must not import torch, gradio or the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clair.errors import ConfigError


def setting(default: Any, help: str, *, flag: str | None = None, choices: Sequence[str] = (), env: str = ""):
    """Declare one setting: a dataclass field whose metadata carries its documentation."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": tuple(choices), "env": env})


@dataclass(frozen=True)
class Config:
    # --- serving -------------------------------------------------------------------------------
    host: str = setting(
        "127.0.0.1", "Address to serve on. 0.0.0.0 to reach Clair from other machines on the LAN.", flag="--host"
    )
    port: int = setting(7860, "Port to serve on.", flag="--port")
    auth: str = setting("", "Optional login as user:password (recommended when serving the LAN).", flag="--auth")
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
    )
    keep_alive: str = setting(
        "30m", "How long Ollama keeps the chat model loaded when idle: Go duration (30m, 1h) or seconds."
    )
    system_prompt: str = setting("You are a helpful assistant.", "Default system prompt for new chats.")
    max_new_tokens: int = setting(1024, "Longest reply, in tokens (options.num_predict for Ollama).")
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
    ollama_timeout_s: float = setting(
        120.0, "Longest silence tolerated from Ollama while it loads or streams, in seconds."
    )
    preload: bool = setting(
        True, "Load the models into host memory at start-up (not onto the GPU), so the first request is quick."
    )
    warmup: bool = setting(True, "Reload the chat model in the background after a render evicted it.")
    warmup_delay_s: float = setting(
        2.0, "Seconds to wait after a render before that reload, so renders in quick succession skip it."
    )

    # --- images --------------------------------------------------------------------------------
    image_model: str = setting(
        "SG161222/RealVisXL_V5.0",
        "SDXL checkpoint: hub id, local diffusers folder, or tiny (random weights).",
        flag="--image-model",
    )
    output_dir: str = setting("outputs", "Where rendered PNGs are saved (with their parameters).", flag="--output-dir")
    state_dir: str = setting(
        "",
        "Where Clair keeps what it measured across restarts (clair-state.json: Ollama's loaded model sizes). "
        "Empty: the folder that holds the output folder (never inside it: the outputs are served).",
    )
    gallery_size: int = setting(24, "How many recent images the gallery shows.")

    # --- the GPU arbiter -----------------------------------------------------------------------
    gpu_policy: str = setting(
        "budget",
        "budget: evict only what must go to stay under the VRAM budget. exclusive: evict the other "
        "tenant before every hand-over (the seed's behaviour).",
        flag="--gpu-policy",
        choices=("budget", "exclusive"),
    )
    vram_budget_gb: float = setting(
        0.0,
        "VRAM ceiling Clair keeps to, in GB (GiB, as nvidia-smi counts). 0 = the device's total less vram_reserve_gb; without "
        "CUDA, 0 means unknown, so nothing is assumed to fit beside a render.",
        flag="--vram-budget-gb",
    )
    vram_reserve_gb: float = setting(1.5, "Safety margin left free when the budget is derived from the device.")
    pinned_offload: str = setting(
        "auto",
        "Keep a pinned host copy of in-process weights for fast swaps. auto checks free RAM first.",
        choices=("auto", "on", "off"),
    )
    chat_priority: str = setting(
        "next",
        "next: a chat waits for at most the render in front of it. fifo: strict arrival order.",
        choices=("next", "fifo"),
    )
    evict_timeout_s: float = setting(60.0, "How long to wait for Ollama to free the GPU before giving up.")
    queue_timeout_s: float = setting(900.0, "How long a request may wait for the GPU before it is refused.")
    queue_slots: int = setting(16, "GPU requests the web queue lets in at once (the rest wait in Gradio's queue).")

    # ------------------------------------------------------------------------------------------
    @property
    def keep_alive_value(self) -> str | int:
        """keep_alive as Ollama's API wants it: unit-less numbers become seconds (the API rejects "300")."""
        return parse_keep_alive(self.keep_alive)

    @property
    def ollama_url(self) -> str:
        return ollama_url(self.ollama_host)

    @property
    def state_path(self) -> str:
        base = self.state_dir or os.path.dirname(os.path.abspath(os.path.expanduser(self.output_dir)))
        return os.path.join(os.path.expanduser(base), "clair-state.json")

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
    return dataclasses.fields(Config)


_GO_DURATION = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def parse_keep_alive(value: str) -> str | int:
    value = value.strip()
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if value == "0" or _GO_DURATION.match(value):
        return value
    raise ConfigError(f"CLAIR_KEEP_ALIVE={value!r} is not a duration: use seconds (300) or a Go duration (30m, 1h).")


def ollama_url(host: str) -> str:
    """OLLAMA_HOST as Ollama's tools read it: scheme optional (http), port 11434 unless given.

    `http://host` without a port means port 80, as in Ollama's own client (shared/reference/ollama.md).
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
        prog="app.py",
        description="Clair: chat and image generation sharing one GPU. Every option can also be set "
        "through its environment variable (shown in brackets).",
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
        help_text = f"{f.metadata['help']} [{env_name(f)}, default: {f.default}]"
        if f.type == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            choices = f.metadata["choices"] or None
            p.add_argument(flag, dest=f.name, default=None, choices=choices, help=help_text)
    return p


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, overridden by the environment, overridden by flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields():
        raw = environ.get(env_name(f))
        if raw is not None and raw != "":
            values[f.name] = _convert(f, raw)
    args = parser().parse_args(argv if argv is not None else [])
    for f in fields():
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given if isinstance(given, bool) else _convert(f, str(given))
    cfg = Config(**values)
    if cfg.demo:
        # Demo mode swaps in the tiny models unless the user named others explicitly.
        demo_values = {}
        if "image_model" not in values:
            demo_values["image_model"] = "tiny"
        if "local_chat_model" not in values:
            demo_values["local_chat_model"] = "tiny"
        cfg = dataclasses.replace(cfg, **demo_values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    parse_keep_alive(cfg.keep_alive)
    if cfg.chat_num_ctx < 256:
        raise ConfigError(f"CLAIR_CHAT_NUM_CTX={cfg.chat_num_ctx} is too small: use at least 256 (4096 is typical).")
    if cfg.vram_budget_gb < 0:
        raise ConfigError("CLAIR_VRAM_BUDGET_GB must be 0 (automatic) or a positive number of GB.")
    if cfg.auth and ":" not in cfg.auth:
        raise ConfigError("CLAIR_AUTH must look like user:password.")
    if not 1 <= cfg.port <= 65535:
        raise ConfigError(f"CLAIR_PORT={cfg.port} is not a TCP port.")
    if cfg.queue_slots < 1:
        raise ConfigError("CLAIR_QUEUE_SLOTS must be at least 1.")


def env_example() -> str:
    lines = [
        "# Clair's settings (generated by `python -m clair.config --env`). Uncomment to change.",
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
