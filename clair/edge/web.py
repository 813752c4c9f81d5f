"""The web surface Clair shows the LAN: hosts, origins, logins, sessions, connections, uploads.

Gradio's own defaults assume a trusted network, so `Guard`, one ASGI middleware in front of the whole
app, decides before Gradio sees a request:

* Host: only the names Clair serves (loopback; when it serves the LAN, this machine's name and
  interface addresses; CLAIR_ALLOWED_HOSTS). Anything else gets 421, which closes the DNS-rebinding
  door (a hostile name that resolves to Clair's address).
* Origin: state-changing requests (POST, PUT, PATCH, DELETE, and websockets) from another origin, or
  that a browser marks `Sec-Fetch-Site: cross-site`/`same-site`, get 403. Requests without these headers
  (gradio_client, curl) pass: they carry no ambient browser cookies to abuse. CORS grants none: the parent
  app carries Starlette's CORSMiddleware with no allowed origin, which also switches off Gradio's own
  CustomCORSMiddleware (it echoes any Origin with credentials when the Host is not localhost).
* Login: with users, every route but the login page and its static assets (and the ok/not-ok
  `/healthz`) needs a session. Failed logins are logged (name and address, never the password) and
  back off per address: three free tries, then 2, 4, 8 ... up to 300 s of 429 + Retry-After. One check
  at a time per address, and two scrypt checks at a time overall, bound the memory scrypt takes.
* API keys: `/v1` (clair/adapters/openai_api.py, for other programs) takes no session: with users, it needs an
  `Authorization: Bearer` key (clair/edge/keys.py); wrong keys back off like failed logins, and refusals are
  shaped as OpenAI's errors. Host and origin checks apply to it as to everything else.
* Sessions: Gradio keeps `token -> user` in `App.tokens` with no expiry. `Sessions` replaces that
  dict: it remembers when each token was issued and forgets it after CLAIR_SESSION_HOURS, or once its
  user is deleted. Logout is a POST that ends only the caller's session (Gradio's GET /logout ended
  every session of the user, and any page could trigger it with a link).
* Connections: one address may hold a quarter of CLAIR_MAX_CONNECTIONS at once; uvicorn's
  limit_concurrency caps the total. Uploads are refused (Clair takes none) and request bodies are capped,
  each and all together (clair.edge.guard.BodyBudget); a person's GPU requests on the Ollama port are
  counted before their body is read (clair.edge.guard.PerPerson).
* Files: an image of Clair's is its owner's on every file route, Gradio's cache copy of it included.
* Every answer carries frame-ancestors/X-Frame-Options, nosniff and a same-origin referrer policy.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import cookie_parser

from clair.base.helpers import client_key, is_loopback_client, machine
from clair.edge.guard import (
    BUDGET_RETRY_S,
    OLLAMA,
    OPENAI,
    PARSED,
    WEB,
    BadJson,
    BodyBudget,
    BodyClaim,
    BodyRefused,
    PerPerson,
    error_body,
    parse_json_async,
    read_body,
    replay,
    too_large,
)
from clair.edge.keys import Keys, bearer, keys_path
from clair.edge.users import UserError
from clair.service.forwarded import busy_note, counted_as

log = logging.getLogger("clair.edge.web")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_MAX_BODY = 64 * 1024  # the web port outside /gradio_api/ and /v1: a login form (no login needed to send it)
MAX_BODY = 8 * 1024 * 1024  # Clair takes text and numbers only; the largest legitimate body is a long chat
SECURITY_HEADERS = {
    "content-security-policy": "frame-ancestors 'self'",
    "x-frame-options": "SAMEORIGIN",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
# What a logged-out browser may load: the login page and what it is drawn with. Nothing here depends
# on the app's content (components, events, files, outputs); /config, /gradio_api/* and the rest do.
PUBLIC_EXACT = frozenset(
    {"/", "/healthz", "/theme.css", "/favicon.ico", "/pwa_icon", "/robots.txt", "/manifest.json", "/gradio_api/login_check"}
)
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/")
# Open without a login to this machine only (a local Prometheus): from any other address they need one.
# A reverse proxy on this machine is listed in CLAIR_TRUSTED_PROXIES (then uvicorn puts the client's address
# in its place); a loopback request that carries a forwarding header from an untrusted proxy is not local.
LOOPBACK_OPEN = frozenset({"/metrics"})
LOGIN_PATHS = frozenset({"/login", "/login/"})
LOGOUT_PATHS = frozenset({"/logout", "/logout/"})  # Clair's own routes: POST ends this session, GET nothing

ALWAYS = {"clair_always": True}  # log records the flood filter must let through
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("clair_client", default="?")


FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
UNTRUSTED_PROXY = "untrusted-proxy"  # the address of a request forwarded by a proxy Clair does not trust
_warned_proxy: set[str] = set()


def _warn_untrusted_proxy(address: str) -> None:
    if address not in _warned_proxy:
        _warned_proxy.add(address)
        log.warning(
            "a request from %s carries X-Forwarded-For (a reverse proxy?) but CLAIR_TRUSTED_PROXIES does not name it: "
            "its requests are treated as coming from elsewhere, and all of its clients share one address. "
            "Set CLAIR_TRUSTED_PROXIES=%s if this is your proxy.",
            address,
            address,
            extra=ALWAYS,
        )


# --- addresses ---------------------------------------------------------------------------------


def interface_addresses() -> list[tuple[str, str]]:
    """(interface, address) for every non-loopback IPv4/IPv6 address of this machine."""
    import psutil

    out = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = a.address.split("%", 1)[0]
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if ip.is_loopback or ip.is_unspecified:
                continue
            out.append((name, str(ip)))
    return out


def lan_urls(host: str, port: int, scheme: str = "http") -> list[str]:
    """The URLs other machines can open: each interface address Clair listens on (never 0.0.0.0 or loopback)."""
    from clair.base.config import is_loopback

    if is_loopback(host):
        return []

    def url(addr: str) -> str:
        return f"{scheme}://[{addr}]:{port}" if ":" in addr else f"{scheme}://{addr}:{port}"

    if host not in ("0.0.0.0", "::", ""):
        return [url(host)]
    urls = []
    for _name, addr in interface_addresses():
        ip = ipaddress.ip_address(addr)
        if ip.version == 6 and (host == "0.0.0.0" or ip.is_link_local):
            continue  # 0.0.0.0 listens on IPv4 only; link-local IPv6 needs a zone id browsers reject
        if url(addr) not in urls:
            urls.append(url(addr))
    return urls


def lan_note(cfg) -> str:
    """The line the UI shows when Clair serves the LAN: where the other machines open it."""
    urls = lan_urls(cfg.host, cfg.port, "https" if cfg.tls_cert else "http")
    if not urls:
        return ""
    return "On your other devices, open " + " or ".join(f"[{u}]({u})" for u in urls) + "."


def lan_qr(cfg) -> str:
    """An <img> with a QR code of the first LAN link, for phones; empty without a link (or without segno)."""
    import base64
    import html
    import io

    urls = lan_urls(cfg.host, cfg.port, "https" if cfg.tls_cert else "http")
    try:
        import segno
    except ImportError:
        return ""
    if not urls:
        return ""
    buf = io.BytesIO()
    segno.make(urls[0], error="m").save(buf, kind="svg", scale=4, border=3, light="#fff", xmldecl=False)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    label = html.escape(f"QR code: {urls[0]}")
    return f'<img src="data:image/svg+xml;base64,{data}" alt="{label}" title="{label}" width="120" height="120">'


def has_users(cfg) -> bool:
    from clair.edge.users import Users

    try:
        return bool(Users(cfg.users_path).names())
    except Exception:
        return False


LOGOUT_JS = "() => fetch('logout', {method: 'POST'}).then(() => location.reload())"


class Hosts:
    """The Host names Clair answers to. Interface addresses are re-read (at most every 30 s) on a miss."""

    LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})

    def __init__(self, bind_host: str, extra: str = ""):
        from clair.base.config import is_loopback

        self.lan = not is_loopback(bind_host)
        self.bind_host = bind_host.strip("[]").lower()
        self.extra = frozenset(h.strip().lower().rstrip(".") for h in extra.split(",") if h.strip())
        self._lock = threading.Lock()
        self._names: frozenset[str] = frozenset()
        self._read_at = -1e9
        self._refresh()

    def _refresh(self) -> None:
        names = set(self.LOOPBACK) | self.extra
        if self.bind_host not in ("0.0.0.0", "::", ""):
            names.add(self.bind_host.strip("[]").lower())  # the address Clair prints, loopback ones too (127.0.0.2)
        if self.lan:
            try:
                names.update(addr.lower() for _n, addr in interface_addresses())
            except Exception:
                log.exception("could not list the network interfaces")
            for name in (socket.gethostname(), socket.getfqdn()):
                name = name.lower().rstrip(".")
                if name:
                    names.add(name)
                    names.add(name.split(".", 1)[0] + ".local")  # mDNS (Avahi) name
        self._names = frozenset(names)
        self._read_at = time.monotonic()

    @staticmethod
    def hostname(netloc: str) -> str | None:
        try:
            name = urlsplit("//" + netloc).hostname
        except ValueError:
            return None
        return name.rstrip(".") if name else None

    def allowed(self, netloc: str | None) -> bool:
        name = self.hostname(netloc or "")
        if not name:
            return False
        if name in self._names or name.endswith(".localhost"):
            return True
        with self._lock:
            if time.monotonic() - self._read_at > 30:
                self._refresh()
            return name in self._names


# --- sessions ----------------------------------------------------------------------------------


class Sessions(dict):
    """Gradio's `App.tokens` (token -> user name) with an issue time per token and an expiry.

    Gradio writes `tokens[token] = user` at login and reads `tokens.get(token)` to find the user of a
    request (gr.Request.username comes from there), so a token that is too old, whose user was deleted,
    or whose user's password changed since the login (`user_stamp`), reads as absent: the request is
    anonymous and the login page comes back.
    """

    def __init__(self, max_age_s: float, user_stamp=lambda name: "", clock=time.time):
        super().__init__()
        self.max_age_s = max_age_s
        self.user_stamp = user_stamp  # name -> something that changes with the password; None: no such user
        self.clock = clock
        self.issued: dict[str, float] = {}
        self.stamps: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def __setitem__(self, token, user) -> None:
        stamp = self.user_stamp(user)
        with self._lock:
            super().__setitem__(token, user)
            self.issued[token] = self.clock()
            self.stamps[token] = stamp
        self.sweep()

    def _valid(self, token) -> bool:
        if not dict.__contains__(self, token):
            return False
        stamp = self.user_stamp(dict.__getitem__(self, token))
        if (
            self.clock() - self.issued.get(token, 0.0) > self.max_age_s
            or stamp is None
            or stamp != self.stamps.get(token)
        ):
            self.drop(token)
            return False
        return True

    def get(self, token, default=None):
        return dict.__getitem__(self, token) if token is not None and self._valid(token) else default

    def __getitem__(self, token):
        if not self._valid(token):
            raise KeyError(token)
        return dict.__getitem__(self, token)

    def __contains__(self, token) -> bool:
        return self._valid(token)

    def drop(self, token) -> None:
        with self._lock:
            self.pop(token, None)
            self.issued.pop(token, None)
            self.stamps.pop(token, None)

    def sweep(self) -> None:
        now = self.clock()
        for token in [t for t, at in list(self.issued.items()) if now - at > self.max_age_s]:
            self.drop(token)


# --- login back-off ----------------------------------------------------------------------------


class LoginLimiter:
    """Per-address back-off after failed logins: FREE tries, then 2, 4, 8 ... MAX_DELAY seconds."""

    FREE = 3
    MAX_DELAY = 300.0
    FORGET_AFTER = 3600.0
    MAX_TRACKED = 4096

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._state: OrderedDict[str, list[float]] = OrderedDict()  # key -> [failures, not_before, last]
        self._busy: set[str] = set()

    def retry_after(self, address: str) -> float:
        """Seconds this address must wait before its next try (0: go ahead)."""
        key = client_key(address)
        now = self.clock()
        with self._lock:
            if key in self._busy:
                return 1.0
            st = self._state.get(key)
            if st is None:
                return 0.0
            if now - st[2] > self.FORGET_AFTER:
                del self._state[key]
                return 0.0
            return max(0.0, st[1] - now)

    def begin(self, address: str) -> bool:
        """Claim the address's single login slot; False when a check is already running for it."""
        key = client_key(address)
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
            return True

    def end(self, address: str) -> None:
        with self._lock:
            self._busy.discard(client_key(address))

    def failure(self, address: str) -> float:
        """Record a failure; returns the delay now imposed."""
        key = client_key(address)
        now = self.clock()
        with self._lock:
            st = self._state.pop(key, None) or [0.0, 0.0, now]
            if now - st[2] > self.FORGET_AFTER:
                st = [0.0, 0.0, now]
            st[0] += 1
            delay = 0.0 if st[0] <= self.FREE else min(self.MAX_DELAY, 2.0 ** (st[0] - self.FREE))
            st[1], st[2] = now + delay, now
            self._state[key] = st
            while len(self._state) > self.MAX_TRACKED:
                self._state.popitem(last=False)
            return delay

    def success(self, address: str) -> None:
        with self._lock:
            self._state.pop(client_key(address), None)


def make_auth(users, limiter: LoginLimiter):
    """The `auth=` callable for Gradio: checks the users file off the event loop, logs and counts failures."""
    import anyio

    state: dict = {"sem": None}  # an anyio.Semaphore(2), made inside the event loop on first use

    async def auth(username: str, password: str) -> bool:
        address = CLIENT.get()
        if state["sem"] is None:
            state["sem"] = anyio.Semaphore(2)
        async with state["sem"]:
            ok = await anyio.to_thread.run_sync(users.verify, username, password)
        shown = (username or "")[:64]
        if ok:
            limiter.success(address)
            log.info("login user=%r addr=%s", shown, address, extra=ALWAYS)
        else:
            delay = limiter.failure(address)
            log.warning("login failed user=%r addr=%s next_try_in_s=%.0f", shown, address, delay, extra=ALWAYS)
        return ok

    return auth


# --- the middleware ----------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the key check says about one API request: refuse (status > 0) or go on as `user`."""

    status: int = 0
    message: str = ""
    code: str = ""
    headers: dict[str, str] | None = None
    user: str | None = None


def is_api_path(path: str) -> bool:
    """Clair's OpenAI-compatible routes (clair/adapters/openai_api.py): keys, not browser sessions."""
    return path == "/v1" or path.startswith("/v1/")


def text_max_body(cfg) -> int:
    """The largest body of a request that carries text only (Gradio's events, /v1): its texts at Clair's
    limits (a history, a message, a system prompt, two image prompts) at 16 bytes a character (JSON's \\u
    escapes take 6 to 12), plus 256 KiB for the rest; about 1.3 MB with the defaults. Parsing JSON holds
    the interpreter (Gradio even parses on the event loop): an 8 MB body held every other client for
    seconds, so these routes take no more than their texts need."""
    chars = cfg.max_history_chars + 2 * cfg.max_message_chars + 2 * cfg.max_prompt_chars
    return min(MAX_BODY, 16 * chars + 256 * 1024)


class Web:
    """Everything the guard needs, shared with the routes in clair/main.py."""

    def __init__(self, cfg, users):
        self.cfg = cfg
        self.users = users
        self.hosts = Hosts(cfg.host, cfg.allowed_hosts)
        self.limiter = LoginLimiter()
        self.sessions = Sessions(cfg.session_hours * 3600.0, user_stamp=users.stamp)
        self.gradio = None  # the mounted gradio App, set once mounted
        self.per_address = max(8, cfg.max_connections // 4)
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        self.auth = None  # the auth callable given to Gradio
        self.open_allowed = cfg.loopback_only or cfg.insecure  # may serve with no users at all
        self.keys = Keys(keys_path(cfg.users_path), users)  # API keys (clair/edge/keys.py), beside the users
        self.users_required_cached = False  # sync_auth's last answer
        self.text_max_body = text_max_body(cfg)
        self.session_owners = SessionOwners()
        self.bodies = BodyBudget()  # the bytes of request bodies held at once, both ports together
        self.in_flight = PerPerson(cfg.max_jobs_per_user)  # GPU requests per person, counted before their body

    def api_key_check(self, headers: Headers, address: str) -> Verdict:
        """The key an API request carries: needed whenever Clair has users (clair/edge/keys.py).

        Wrong keys back off per address like failed logins (the same counter); a missing key does not
        count as a try.
        """
        if not self.sync_auth():
            return Verdict()
        wait = self.limiter.retry_after(address)
        if wait > 0:
            n = str(int(wait + 0.999))
            return Verdict(429, f"Too many wrong keys or passwords from your address: try again in {n} s.", "rate_limited", {"retry-after": n})
        key = bearer(headers.get("authorization"))
        if key is None:
            return Verdict(
                401,
                "Clair needs an API key here: send `Authorization: Bearer <key>` (OpenAI clients: api_key=...). "
                "Whoever runs Clair makes one with `python app.py addkey NAME`.",
                "missing_api_key",
            )
        try:
            user = self.keys.verify(key)
        except UserError:
            log.exception("the keys file cannot be read")
            return Verdict(503, "Clair's keys file cannot be read: tell whoever runs Clair.", "server_error")
        if user is not None and user not in self.users.names():
            log.warning("api key of a user who no longer exists refused name=%s addr=%s", user, address, extra=ALWAYS)
            user = None  # a deleted user's keys end with their sessions
        if user is None:
            delay = self.limiter.failure(address)
            log.warning("api key refused addr=%s next_try_in_s=%.0f", address, delay, extra=ALWAYS)
            return Verdict(401, "Incorrect API key: check it, or ask for a new one (`python app.py addkey NAME`).", "invalid_api_key")
        self.limiter.success(address)
        return Verdict(user=user)

    def sync_auth(self) -> bool:
        """Whether a login is needed now; Gradio's login switches on with the first user (no restart)."""
        required = bool(self.users.names())
        self.users_required_cached = required
        if self.gradio is not None:
            self.gradio.auth = self.auth if required else None
        return required

    def cookie_names(self) -> tuple[str, str]:
        cid = self.gradio.cookie_id if self.gradio is not None else ""
        return f"access-token-{cid}", f"access-token-unsecure-{cid}"

    def token(self, headers: Headers) -> str | None:
        cookies = cookie_parser(headers.get("cookie", ""))
        secure, unsecure = self.cookie_names()
        return cookies.get(secure) or cookies.get(unsecure)

    def user(self, headers: Headers) -> str | None:
        return self.sessions.get(self.token(headers))

    def origin_ok(self, origin: str, host: str | None) -> bool:
        if not origin or origin == "null":
            return False
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:
            return False
        if host and netloc == host.lower():
            return True
        return Hosts.hostname(netloc) in self.hosts.extra

    def _enter(self, key: str) -> bool:
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.per_address:
                return False
            self._open[key] = n + 1
            return True

    def _leave(self, key: str) -> None:
        with self._lock:
            n = self._open.get(key, 1) - 1
            if n <= 0:
                self._open.pop(key, None)
            else:
                self._open[key] = n


WEB_PORT, OLLAMA_PORT = "web", "ollama"
MISSING = object()  # no JSON body
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
# The one answer to a file the web port will not serve: another user's image (the guard), a missing file or one
# outside Gradio's allowed folders (Gradio says 403 "File not allowed: <the path>"). The same status and text
# for all, so the answer never tells whether someone else's file exists, nor repeats the path asked for.
NO_SUCH_FILE = (404, "No such file.")


@dataclass
class Refusal:
    status: int
    text: str
    code: str = ""
    headers: dict[str, str] | None = None


async def refuse(send, protocol: str, status: int, text: str, code: str = "", headers: dict[str, str] | None = None) -> None:
    """A refusal in the protocol's one error shape (clair.edge.guard.error_body), with the security headers."""
    body = json.dumps(error_body(protocol, status, text, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in {**SECURITY_HEADERS, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _loopback_origin(origin: str) -> bool:
    name = Hosts.hostname(origin.split("://", 1)[-1]) if "://" in origin else None
    return bool(name) and (name == "localhost" or name.endswith(".localhost") or is_loopback_client(name))


def session_hashes(method: str, path: str, query: bytes, body) -> list[str]:
    """The Gradio session hashes a request names: in the query, the heartbeat or stream path, or the body."""
    found = [v for v in parse_qs(query.decode("latin-1")).get("session_hash", [])]
    if method == "GET":
        for prefix in ("/gradio_api/heartbeat/", "/gradio_api/stream/"):
            if path.startswith(prefix):
                found.append(path[len(prefix):].split("/", 1)[0])
    if isinstance(body, dict) and isinstance(body.get("session_hash"), str):
        found.append(body["session_hash"])
    return found


class SessionOwners:
    """Gradio session hash -> the user who used it first. Gradio keys a page's state, its event stream and
    its cancels by the hash alone; bound here, another user's hash is worth nothing (404)."""

    MAX = 100_000

    def __init__(self) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, session_hash: str, user: str) -> bool:
        with self._lock:
            owner = self._owners.get(session_hash)
            if owner is None:
                self._owners[session_hash] = user
                while len(self._owners) > self.MAX:
                    self._owners.popitem(last=False)
                return True
            self._owners.move_to_end(session_hash)
            return owner == user


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def file_owner(path: str) -> str | None:
    """The owner a PNG of Clair's records in its metadata, wherever the file a file route names lies: the
    output folder, or the copy Gradio keeps in its cache of every image a handler returned (`/gradio_api/
    file=/tmp/gradio/<hash>/...`: the same bytes, so the same metadata). None for anything else, which
    Gradio's own rules decide on. Only regular files are opened (a FIFO would hold the thread)."""
    if path.startswith(("http://", "https://")):
        return None
    try:
        real = os.path.realpath(path)
        if not stat.S_ISREG(os.stat(real).st_mode):
            return None
        with open(real, "rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return None
        from clair.engines.image import read_metadata

        owner = read_metadata(real).get("owner")  # Clair's chunk comes before the pixels: read without decoding them
    except Exception:
        return None
    return owner if isinstance(owner, str) else None


class Guard:
    """The ASGI middleware of every port (see the module docstring). `port` is WEB_PORT (Gradio, /v1:
    sessions, logins, uploads) or OLLAMA_PORT (clair/adapters/gateway.py: keys from other machines only, since
    Ollama answers anyone on this machine; refusals in Ollama's shape)."""

    def __init__(self, app, web: Web, port: str = WEB_PORT, max_body: int = MAX_BODY, gpu_paths=(), busy=None):
        self.app = app
        self.web = web
        self.port = port
        self.max_body = max_body  # /v1 and Gradio's events take text only: at most web.text_max_body
        # POSTs that take a job slot once read: counted per person before their body is read (PerPerson).
        self.gpu_paths = frozenset(gpu_paths)
        self.busy = busy or (  # the refusal's words: the job slot's own, from the adapter that has them
            lambda: "Busy: too many of your requests are waiting or running (the limit per person, CLAIR_MAX_JOBS_PER_USER)."
        )

    def protocol(self, path: str) -> str:
        return OPENAI if is_api_path(path) else (OLLAMA if self.port == OLLAMA_PORT else WEB)

    def check(self, scope, headers: Headers, address: str, method: str, path: str) -> tuple[Refusal | None, dict]:
        """Everything decided from the request line and headers: (a refusal or None, the scope to go on with)."""
        web = self.web
        host = headers.get("host")
        if not web.hosts.allowed(host):
            log.warning("refused host=%r addr=%s path=%s", (host or "")[:100], address, path[:100])
            return Refusal(421, "Clair does not answer to this host name. Open it by the address it printed at "
                           "start-up, or add the name to CLAIR_ALLOWED_HOSTS.", "bad_host"), scope
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            site = (headers.get("sec-fetch-site") or "").lower()
            bad = site in ("cross-site", "same-site") or (origin is not None and not web.origin_ok(origin, host))
            if self.port == OLLAMA_PORT and _loopback_origin(origin or ""):
                bad = False  # browser tools on this machine talk to Ollama's port from their own origins
            if bad:
                log.warning("refused cross-origin %s %s origin=%r addr=%s", method, path[:100], (origin or "")[:100], address)
                return Refusal(403, "Requests from other sites are refused.", "forbidden_origin"), scope
        try:
            users_required = web.sync_auth()
        except Exception:
            log.exception("the users file cannot be read")
            return Refusal(503, "Clair's users file cannot be read: tell whoever runs Clair (details in its log).", "server_error"), scope
        web_port = self.port == WEB_PORT
        if web_port and not users_required and not web.open_allowed and path != "/healthz":
            return Refusal(503, "Clair has no users yet: whoever runs it adds one with `python app.py adduser NAME`."), scope
        if web_port and method == "POST" and path.startswith("/gradio_api/upload"):
            return Refusal(403, "Clair takes no uploads."), scope
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cap(path)):
            return Refusal(413, too_large(self.cap(path)), "too_large"), scope
        if web_port and method == "POST" and path in LOGIN_PATHS:
            wait = web.limiter.retry_after(address)
            if wait > 0:
                n = str(int(wait + 0.999))
                return Refusal(429, f"Too many failed logins from your address: try again in {n} s.", "", {"retry-after": n}), scope
        elif is_api_path(path) or not web_port:
            # Keys, never cookies. On the Ollama port a request from this machine needs none (module docstring).
            keyless = not users_required or (not web_port and is_loopback_client(address))
            verdict = Verdict() if keyless else web.api_key_check(headers, address)
            if verdict.status:
                return Refusal(verdict.status, verdict.message, verdict.code, verdict.headers), scope
            if verdict.user:
                scope = {**scope, "clair_api_user": verdict.user}
        elif (
            users_required
            and not (path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES) or path in LOGOUT_PATHS)
            and not (path in LOOPBACK_OPEN and is_loopback_client(address))
            and web.user(headers) is None
        ):
            return Refusal(401, "Not logged in: open Clair's page and log in."), scope
        return None, scope

    def cap(self, path: str) -> int:
        if self.port == OLLAMA_PORT:
            # Only a GPU request may carry images (a chat's, on /api/chat or Ollama's own /v1, forwarded as
            # sent); the other routes (/api/show names a model) take text.
            return self.max_body if not self.gpu_paths or path in self.gpu_paths else self.web.text_max_body
        if is_api_path(path) or path.startswith("/gradio_api/"):
            return self.web.text_max_body  # text only: what Clair's text limits allow
        return FORM_MAX_BODY  # the login form; every other route takes no body (and none is read for it)

    def reads_json(self, headers: Headers, path: str) -> bool:
        if is_api_path(path) or self.port == OLLAMA_PORT:
            return True
        return "json" in (headers.get("content-type") or "").lower()

    async def body(self, receive, headers: Headers, path: str, claim: BodyClaim) -> tuple[Refusal | None, bytes | None, object]:
        """Read the body within the cap and the BodyBudget (`claim`, grown as its bytes arrive; a Content-Length
        that would not fit now is refused before a byte is read) while it keeps moving, and parse JSON off the
        event loop: (a refusal or None, the body (None: the client left), the parsed JSON or MISSING)."""
        length = headers.get("content-length")
        try:
            if length is not None and length.isdigit() and not claim.fits(int(length)):
                raise claim.refusal()
            raw = await read_body(receive, self.cap(path), claim=claim)
        except BodyRefused as exc:
            code = {413: "too_large", 503: "server_busy"}.get(exc.status, "timeout")
            retry = {"retry-after": str(BUDGET_RETRY_S)} if exc.status == 503 else None
            return Refusal(exc.status, str(exc), code, retry), None, MISSING
        if raw is None or not raw.strip() or not self.reads_json(headers, path):
            return None, raw, MISSING
        try:
            return None, raw, await parse_json_async(raw)
        except BadJson as exc:
            return Refusal(400, f"The body is not valid JSON: {exc}.", "invalid_json"), raw, MISSING

    def admit(self, scope, headers: Headers, address: str, method: str, path: str, claim: BodyClaim):
        """A GPU route's request counted for its person before its body is read (and its body claimed in the
        person's name): (its `leave`, None), or (None, a refusal) at the person's cap, or (None, None) for any
        other request."""
        if scope["type"] != "http" or method != "POST" or path not in self.gpu_paths:
            return None, None
        who, counted = counted_as(self.web.cfg, scope.get("clair_api_user"), address, headers)
        claim.who = who
        leave = self.web.in_flight.enter(who)
        if leave is None:
            log.info("request refused before its body was read: per-person cap who=%s path=%s", who, path[:100])
            return None, Refusal(429, busy_note(self.busy(), counted), "too_many_jobs", {"retry-after": "5"})
        return leave, None

    async def owned(self, method: str, path: str, scope, parsed, user: str | None) -> Refusal | None:
        """With users, a Gradio session hash and an image of Clair's (in the output folder, or Gradio's cache copy
        of one) are their user's only."""
        if self.port != WEB_PORT or user is None:
            return None
        for h in session_hashes(method, path, scope.get("query_string", b""), parsed):
            if not self.web.session_owners.claim(h, user):
                log.warning("refused another user's session user=%s path=%s", user, path[:100])
                return Refusal(404, "No such session: reload the page.")
        if path.startswith(FILE_ROUTES) and not self.web.cfg.shared_gallery:
            # Any file these routes serve that is one of Clair's images (in the output folder, or Gradio's
            # cache copy of one a handler returned) is its owner's only.
            target = path.split("=", 1)[1] if path.startswith(FILE_ROUTES[0]) else path[len(FILE_ROUTES[1]):]
            owner = await anyio.to_thread.run_sync(file_owner, target)
            if owner is not None and owner != user:
                log.warning("refused another user's image user=%s path=%s", user, path[:100])
                return Refusal(*NO_SUCH_FILE)
        return None

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        web = self.web
        headers = Headers(scope=scope)
        address = (scope.get("client") or ("?", 0))[0]
        if is_loopback_client(address) and any(h in headers for h in FORWARDING_HEADERS):
            # A reverse proxy on this machine that Clair was not told to trust (CLAIR_TRUSTED_PROXIES: uvicorn
            # then left the header alone): the client is somewhere else, so the request is not local. Without
            # this, every LAN client behind it would reach /metrics and the Ollama port as this machine does.
            _warn_untrusted_proxy(address)
            address = UNTRUSTED_PROXY
            scope = {**scope, "client": (address, 0)}
        method = scope.get("method", "GET") if kind == "http" else "WEBSOCKET"
        path = scope.get("path", "/")
        protocol = self.protocol(path)

        async def deny(r: Refusal) -> None:
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await refuse(send, protocol, r.status, r.text, r.code, r.headers)

        refusal, scope = self.check(scope, headers, address, method, path)
        if refusal is not None:
            await deny(refusal)
            return
        key = client_key(address)
        if not web._enter(key):
            await deny(Refusal(429, "Too many open connections from your address.", "too_many_requests", {"retry-after": "5"}))
            return
        token = CLIENT.set(address)
        login_claimed = self.port == WEB_PORT and method == "POST" and path in LOGIN_PATHS
        claim, leave = web.bodies.claim(machine(address)), None
        try:
            if login_claimed and not web.limiter.begin(address):
                login_claimed = False
                await deny(Refusal(429, "A login from your address is already being checked.", "", {"retry-after": "1"}))
                return
            leave, refusal = self.admit(scope, headers, address, method, path, claim)
            if refusal is not None:
                await deny(refusal)
                return
            parsed = MISSING
            if kind == "http" and method in BODY_METHODS:
                refusal, raw, parsed = await self.body(receive, headers, path, claim)
                if refusal is not None:
                    await deny(refusal)
                    return
                if raw is None:
                    return  # the client went away
                receive = replay(raw, receive)
                if parsed is not MISSING:
                    scope = {**scope, PARSED: parsed}
            user = web.user(headers) if web.users_required_cached else None
            refusal = await self.owned(method, path, scope, parsed, user)
            if refusal is not None:
                await deny(refusal)
                return
            await self.app(scope, receive, _leaving(self.sender(scope, send, headers, method, path, address), leave))
        finally:
            claim.close()
            if leave is not None:
                leave()
            if login_claimed:
                web.limiter.end(address)
            web._leave(key)
            CLIENT.reset(token)

    def sender(self, scope, send, headers: Headers, method: str, path: str, address: str):
        """`send` with the security headers, Secure cookies under TLS, and Gradio's own refusals reworded."""
        tls = scope.get("scheme") in ("https", "wss")
        # Gradio checks an event's inputs against their components before Clair's handlers run, and answers
        # a mismatch with 400 and its own text (pydantic's errors, server paths it could not copy). Clients
        # get Clair's words instead; the details go to the log under an id.
        rewrite = method == "POST" and (path == "/gradio_api/queue/join" or path.startswith("/gradio_api/run/"))
        held: dict = {"start": None, "body": b""}

        async def secured_send(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in h:
                        h[name] = value
                if tls:
                    secure_cookies(message)
                if rewrite and message.get("status") == 400:
                    held["start"] = message
                    return
            elif held["start"] is not None and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                await _reworded(send, held["start"], held["body"], address, path)
                return
            await send(message)

        if self.port == WEB_PORT and method in ("GET", "HEAD") and path.startswith(FILE_ROUTES):
            return _no_such_file(secured_send, send)
        if self.port == WEB_PORT and self.web.users_required_cached and scope["type"] == "http" and path == "/" and self.web.user(headers) is None:
            # Gradio embeds the whole API description (every endpoint and its parameters) in the page
            # it serves logged-out visitors for the login form; they get an empty one.
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
            return _login_page_sender(secured_send)
        return secured_send


def _leaving(send, leave):
    """`send`, calling `leave` (a PerPerson count) just before the answer's last bytes go out: a client that
    sends its next request as soon as it has the answer finds its count already down."""
    if leave is None:
        return send

    async def sender(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            leave()
        await send(message)

    return sender


def _no_such_file(send, raw_send):
    """`send` for Gradio's file routes: a file Gradio refuses (403: missing, a folder, outside its allowed
    folders; 404; 405: a HEAD on the older `/file/` route) gets the guard's own answer to another user's image
    (NO_SUCH_FILE, sent by `refuse` on `raw_send` as the guard sends it), and Gradio's body, which names the
    path asked for, is dropped."""
    replaced = False

    async def sender(message):
        nonlocal replaced
        if message["type"] == "http.response.start" and message.get("status") in (403, 404, 405):
            replaced = True
            await refuse(raw_send, WEB, *NO_SUCH_FILE)
            return
        if not replaced:
            await send(message)

    return sender


def secure_cookies(start: dict) -> None:
    """Mark every cookie of a response Secure (Gradio sets `access-token-unsecure-*` without it, which a
    page could then have the browser send to a plain-HTTP port of the same host)."""
    out = []
    for k, v in start.get("headers", []):
        if k.lower() == b"set-cookie" and b"secure" not in [p.strip().lower() for p in v.split(b";")[1:]]:
            v = v + b"; Secure"
        out.append((k, v))
    start["headers"] = out


async def _reworded(send, start: dict, body: bytes, address: str, path: str) -> None:
    ident = secrets.token_hex(3)
    log.warning(
        "request refused before Clair's checks id=%s addr=%s path=%s detail=%r",
        ident, address, path[:100], body[:600].decode("utf-8", "replace"),
    )
    out = json.dumps(
        {
            "detail": "Clair could not read this request: an input is not what this event takes (a chat "
            f"history must be plain text; numbers must be numbers). (error id {ident})"
        }
    ).encode()
    h = MutableHeaders(scope=start)
    h["content-type"] = "application/json"
    h["content-length"] = str(len(out))
    await send(start)
    await send({"type": "http.response.body", "body": out})


API_INFO = re.compile(rb"(<script>window\.gradio_api_info = ).*?(;</script>)", re.S)
EMPTY_API_INFO = b'{"named_endpoints": {}, "unnamed_endpoints": {}}'


def _login_page_sender(send):
    """Buffer the login page and blank the API description Gradio puts into it."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def sender(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = API_INFO.sub(lambda m: m.group(1) + EMPTY_API_INFO + m.group(2), b"".join(chunks), count=1)
        # The login page has no title (its browser tab reads nothing): Clair's.
        body = body.replace(b'<meta charset="utf-8" />', b'<meta charset="utf-8" />\n\t\t<title>Clair</title>', 1)
        headers = MutableHeaders(scope=start)
        if "content-length" in headers:
            headers["content-length"] = str(len(body))
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return sender


# --- logging ------------------------------------------------------------------------------------


class RepeatFilter(logging.Filter):
    """Let at most `burst` records with the same (logger, level, template) through per `window` seconds.

    A flood of failing connections (accept errors, disconnects, ASGI exceptions) otherwise writes a
    line, often a traceback, per event. The first record after a quiet spell says how many were dropped.
    """

    def __init__(self, burst: int = 5, window: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._seen: dict[tuple, list[float]] = {}  # key -> [window_start, count, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "clair_always", False):
            return True  # each login (and failed login) is logged: the back-off bounds their rate
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = self.clock()
        with self._lock:
            st = self._seen.get(key)
            if st is None or now - st[0] > self.window:
                dropped = int(st[2]) if st else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 1000:
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] <= self.window}
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this were dropped]"
                return True
            st[1] += 1
            if st[1] <= self.burst:
                return True
            st[2] += 1
            return False


def install_log_filter() -> None:
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter())


# --- connections: per address, and the time to send a request ---------------------------------------

HEADER_TIMEOUT_S = 10.0  # a client has this long to send a request's headers, on a new or a kept-alive connection
# The watchdog asks /healthz from this loopback address (clair.main.healthz): past the per-machine cap, within
# RESERVED_FOR_LOOPBACK. Any local program could use it too; this machine's programs are trusted anyway.
WATCHDOG_SOURCE = "127.0.0.254"
RESERVED_FOR_LOOPBACK = 4  # connections past CLAIR_MAX_CONNECTIONS only this machine may open (the watchdog's /healthz)
# A body in tiny pieces: past TINY_PIECES pieces (h11 Data events: chunks, or reads of a trickle) a request's
# body must average TINY_BYTES a piece. Each piece costs the event loop ~5 us of h11's Python parsing, and a
# 256 KB read is parsed in one go: 64 KB login forms in 1-byte chunks (6 bytes each on the wire) from 8
# clients kept /healthz 3-5.7 s late (the same forms sent plainly: 0.02 s). A real client's pieces are its
# writes or TCP segments (a kilobyte or more).
TINY_PIECES = 256
TINY_BYTES = 64
TINY_REFUSAL = "The request body came in too many tiny pieces (chunks of a few bytes): send it in larger chunks, or whole."


def _count_pieces(protocol) -> None:
    """Refuse a request whose body arrives in tiny pieces (TINY_PIECES): wraps the h11 connection's
    `next_event` of a uvicorn protocol. Before any answer, uvicorn answers 400 (send_400_response, with
    `_clair_why`); once Clair has answered (a refusal sent before the body was read), the connection is closed."""
    import h11

    conn = protocol.conn
    parse = conn.next_event
    seen = {"pieces": 0, "bytes": 0}

    def next_event():
        event = parse()
        if isinstance(event, h11.Request):
            seen["pieces"] = seen["bytes"] = 0
        elif isinstance(event, h11.Data):
            seen["pieces"] += 1
            seen["bytes"] += len(event.data)
            if seen["pieces"] > TINY_PIECES and seen["bytes"] < TINY_BYTES * seen["pieces"]:
                log.warning("connection closed: %s sent a body in tiny pieces", protocol._clair_machine)
                if conn.our_state is h11.SEND_RESPONSE:
                    protocol._clair_why = TINY_REFUSAL
                    raise h11.RemoteProtocolError(TINY_REFUSAL)
                protocol.transport.close()
                return h11.NEED_DATA
        return event

    conn.next_event = next_event


def trusted_proxies(cfg) -> list[str]:
    """CLAIR_TRUSTED_PROXIES as a list: the only addresses whose X-Forwarded-For is believed (none by default)."""
    return [p.strip() for p in (getattr(cfg, "trusted_proxies", "") or "").split(",") if p.strip()]


def server_limits(cfg) -> dict:
    """uvicorn.Config arguments for a port of Clair's: the connection guard below, and X-Forwarded-For
    trusted from CLAIR_TRUSTED_PROXIES only (uvicorn trusts 127.0.0.1 by default, which let anything local
    pick its own address and dodge the login back-off)."""
    proxies = trusted_proxies(cfg)
    return {
        # Past CLAIR_MAX_CONNECTIONS the guarded protocol refuses connections itself; uvicorn's own limit
        # (a 503 to every request, /healthz too) is set above what the guard lets in.
        "limit_concurrency": cfg.max_connections + RESERVED_FOR_LOOPBACK + 1,
        "http": guarded_protocol(cfg.max_connections, trusted=proxies),
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies or "",
    }


def guarded_protocol(max_connections: int, header_timeout_s: float = HEADER_TIMEOUT_S, trusted=()) -> type:
    """uvicorn's h11 protocol with the connection limits its own `limit_concurrency` lacks.

    uvicorn counts every open connection against `limit_concurrency` from the moment it is accepted, before
    any request exists, gives a client unlimited time to send its headers, and past the limit answers 503 to
    every request: a few hundred half-open connections (a "slowloris") made it answer 503 to everyone, the
    watchdog's /healthz included, and under systemd that is a restart loop. So, per connection:

    * one machine (`machine`: an IPv4 address, an IPv6 /64, loopback as one) may hold a quarter of
      `max_connections`; past it the new connection is closed at once. A trusted proxy (`trusted`,
      CLAIR_TRUSTED_PROXIES) is exempt: it carries many clients, whom the guard tells apart per request; so is
      the watchdog's own address on loopback (WATCHDOG_SOURCE), so local clients cannot shut /healthz out;
    * all machines but this one together may hold `max_connections`; RESERVED_FOR_LOOPBACK more are
      kept for loopback, so a full house never looks like a hung GPU to the watchdog;
    * a request's headers must arrive within `header_timeout_s` of the connection opening, or of the
      previous response ending on a kept-alive one; otherwise the connection is closed. (A body must keep
      moving too: the guard middleware reads it, clair.edge.guard.read_body.)
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_machine = max(8, max_connections // 4)
    exempt = frozenset(trusted) | {WATCHDOG_SOURCE}
    live: dict[str, set] = {}  # machine -> open transports (only touched on the server's event loop)

    def total() -> int:
        return sum(len(v) for v in live.values())

    class GuardedH11Protocol(H11Protocol):
        _clair_timer = None
        _clair_machine = ""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else ""
            key = self._clair_machine = machine(host)
            mine = live.setdefault(key, set())
            mine.difference_update([t for t in mine if t.is_closing()])
            room = max_connections + (RESERVED_FOR_LOOPBACK if key == "loopback" else 0)
            if (len(mine) >= per_machine and host not in exempt) or total() >= room:
                log.warning("connection refused: %s holds %d connections, all hold %d", key, len(mine), total())
                transport.close()
                return
            mine.add(transport)
            self._clair_arm()
            _count_pieces(self)

        def send_400_response(self, msg: str) -> None:
            super().send_400_response(getattr(self, "_clair_why", "") or msg)

        def _clair_arm(self) -> None:
            if self._clair_timer is not None:
                self._clair_timer.cancel()
            self._clair_timer = self.loop.call_later(header_timeout_s, self._clair_expire, self.cycle)

        def _clair_expire(self, cycle) -> None:
            # Still no new request since the timer was armed (none at all, or the last one answered).
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                log.info("connection closed: %s sent no request within %.0f s", self._clair_machine, header_timeout_s)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._clair_arm()

        def connection_lost(self, exc) -> None:
            if self._clair_timer is not None:
                self._clair_timer.cancel()
            mine = live.get(self._clair_machine)
            if mine is not None:
                mine.discard(self.transport)
                if not mine:
                    live.pop(self._clair_machine, None)
            super().connection_lost(exc)

    return GuardedH11Protocol
