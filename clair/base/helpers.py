"""Small pieces every layer uses, with no Clair imports of their own: Go durations, private files, the units clients are counted in.

* `go_duration_s`: a duration as Go's `time.ParseDuration` reads it ("5m", "1h30m", "-1s", "0"), the form
  Ollama takes for `keep_alive` and Clair's settings take for CLAIR_KEEP_ALIVE / CLAIR_IMAGE_KEEP_ALIVE.
  One parser, so the settings and the Ollama-compatible port accept the same texts.
* `write_private`: a file written atomically (a new file created 0600 in the same folder, then renamed
  over the old one) in a folder created 0700, so a crash never leaves half a file and no other local
  account can read it, not even for an instant. Users, keys, measured state, conversations and images.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path

# Go's units (time/format.go, `unitMap`): "µs" is U+00B5 or U+03BC.
_GO_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")  # ASCII digits only, as Go


def go_duration_s(text: str) -> float:
    """Seconds (negative for a negative duration) of a Go duration. Raises ValueError with Go's message."""
    value = text
    text = text.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("+", "-") else text  # one sign at most, as Go's time.ParseDuration
    if body == "0":
        return 0.0
    if re.fullmatch(r"[0-9]+(\.[0-9]*)?", body):
        raise ValueError(f'time: missing unit in duration "{value}"')
    if not body:
        raise ValueError(f'time: invalid duration "{value}"')
    pos, total = 0, 0.0
    while pos < len(body):
        m = _GO_PART.match(body, pos)
        if not m:
            raise ValueError(f'time: invalid duration "{value}"')
        total += float(m.group(1)) * _GO_UNIT[m.group(2)]
        pos = m.end()
    return sign * total


PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(folder: str | os.PathLike) -> Path:
    """`folder` (and missing parents) created 0700; an existing one is left as it is."""
    folder = Path(folder)
    folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    return folder


def write_private(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` atomically, created 0600 (never chmod-ed after), in a folder made 0700."""
    path = Path(path)
    private_dir(path.parent)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --- addresses: the units Clair counts clients in (connection caps, back-off, per-person caps) --------------


def is_loopback_client(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def client_key(address: str) -> str:
    """The unit of back-off and of an anonymous person's caps: one IPv4 address, or one IPv6 /64 (one LAN
    host's range)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and not ip.is_loopback:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def machine(address: str) -> str:
    """The unit of the connection caps: one IPv4 address, one IPv6 /64, and this machine for loopback."""
    return "loopback" if is_loopback_client(address) else client_key(address)
