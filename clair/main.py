"""Start-up: read the config, build the studio and the Gradio app, serve, and talk to systemd.

The web server is uvicorn with the Gradio app mounted at / beside a `/healthz` route (Gradio has no
health route of its own). READY=1 goes to systemd once the server accepts connections and the models are
preloaded into host memory (EXTEND_TIMEOUT_USEC keeps the start from timing out meanwhile); the watchdog
heartbeat is sent only while the health check passes (see Studio.health_problem: a stuck arbiter, or a GPU
holder without progress for CLAIR_STALL_S), so a wedged process is restarted.
"""

from __future__ import annotations

import errno
import faulthandler
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time

from starlette.requests import Request  # module level: FastAPI resolves the routes' annotations here

from clair.base import config, sdnotify
from clair.base.errors import ConfigError
from clair.device import allocator
from clair.edge import keys as keys_mod
from clair.edge import users as users_mod

log = logging.getLogger("clair")


def make_app(studio, demo, users=None):
    """The whole web app: Gradio mounted at / behind clair.edge.web's guard, with /healthz, /metrics and POST /logout."""
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    from clair.edge.access import AccessLog
    from clair.edge.users import Users
    from clair.edge.web import Guard, Web

    cfg = studio.cfg
    users = users if users is not None else Users(cfg.users_path)
    web = Web(cfg, users)
    app = FastAPI(title="Clair", **NO_DOCS)
    # No origin is granted anything. A CORSMiddleware on the parent also makes Gradio's own CORS
    # middleware stand aside (gradio/route_utils.py CustomCORSMiddleware.parent_configures_cors).
    app.add_middleware(CORSMiddleware, allow_origins=[], allow_credentials=False)
    app.add_middleware(Guard, web=web)
    app.add_middleware(AccessLog, web=web, port="web")  # added last, so it runs first: refusals are logged too
    app.state.web = web
    _add_health_routes(app, studio, web)
    _add_session_routes(app, web)
    # The OpenAI-compatible API (clair/adapters/openai_api.py): before Gradio takes "/"; the guard checks its keys.
    from clair.adapters.openai_api import router as openai_router

    app.include_router(openai_router(studio))
    return _mount_gradio(app, studio, demo, web, users)


NO_DOCS = {"docs_url": None, "redoc_url": None, "openapi_url": None}


def _add_health_routes(app, studio, web) -> None:
    """/healthz (the holder and the problem for loopback and logged-in users only) and /metrics."""
    from fastapi.responses import JSONResponse, Response

    from clair.edge.web import is_loopback_client
    from clair.service.metrics import Metrics

    @app.get("/healthz")
    def healthz(request: Request):
        ok = studio.healthy()
        body: dict = {"ok": ok}
        client = request.client.host if request.client else ""
        viewer = web.user(request.headers)
        if is_loopback_client(client) or viewer is not None:
            st = studio.arbiter.status()
            if not is_loopback_client(client):
                from clair.service.panel import private_status  # another user's job: no name or address

                st = private_status(st, viewer)
            body["holder"] = st["holder"] if ok else None
            body["problem"] = None if ok else studio.last_health_problem
        return JSONResponse(body, status_code=200 if ok else 503)

    metrics = Metrics(studio)  # its own registry, per app
    app.state.metrics = metrics

    @app.get("/metrics")
    def metrics_route():
        """Prometheus text format. The guard lets loopback in without a login (clair.edge.web.LOOPBACK_OPEN)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _add_session_routes(app, web) -> None:
    """POST /logout ends this browser's session; GET /logout only offers the button."""
    from fastapi.responses import HTMLResponse, RedirectResponse

    @app.post("/logout")
    def logout(request: Request):
        """End this browser's session only (Gradio's GET /logout ended all of the user's sessions)."""
        token = web.token(request.headers)
        if token is not None:
            web.sessions.drop(token)
        response = RedirectResponse(url="./", status_code=303)
        secure, unsecure = web.cookie_names()
        response.delete_cookie(secure, path="/", secure=True, httponly=True, samesite="none")
        response.delete_cookie(unsecure, path="/", httponly=True)
        return response

    @app.get("/logout")
    def logout_get():
        # A GET must not log anybody out: any page could send one (a link, an <img>).
        return HTMLResponse(
            '<!doctype html><title>Log out</title><form method="post" action="logout">'
            "<button>Log out of Clair</button></form>",
            status_code=405,
            headers={"Allow": "POST"},
        )


def _mount_gradio(app, studio, demo, web, users):
    """Mount the Gradio page at / with Clair's login (clair.edge.web.make_auth), and hand the guard its sessions."""
    import gradio as gr
    from starlette.routing import Mount

    from clair.adapters import ui
    from clair.edge.web import make_auth

    os.makedirs(studio.image.output_dir, exist_ok=True)
    demo.delete_cache = (900, 3600)  # every 15 min, drop Gradio's cached files older than an hour
    auth = make_auth(users, web.limiter)
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        auth_message=ui.login_message(),  # Clair's name and how to get an account, on the login page
        app_kwargs=dict(NO_DOCS),  # a copy: Gradio adds its lifespan to the dict it is given
        allowed_paths=[str(studio.image.output_dir)],
        show_error=False,  # only gr.Error (Clair's own messages) reach clients; see docs/design.md
        max_file_size="1kb",  # Clair takes no uploads; the guard refuses /gradio_api/upload as well
        footer_links=["api", "settings"],
        ssr_mode=False,
        favicon_path=str(ui.ASSETS / "favicon.svg"),
        css_paths=[ui.ASSETS / "clair.css"],
        theme=ui.theme(),
        head=ui.HEAD,  # the browser-side PNG drop reader (assets/drop.js): nothing is uploaded
    )
    mounted = [r for r in app.routes if isinstance(r, Mount)]
    web.gradio = mounted[-1].app
    web.gradio.tokens = web.sessions  # issue times and expiry (clair.edge.web.Sessions)
    web.auth = auth
    web.sync_auth()
    return app


def check_exposure(cfg: config.Config, users) -> None:
    """Refuse to serve a non-loopback address without users, unless --insecure says so."""
    if cfg.loopback_only or users.names():
        return
    if cfg.insecure:
        log.warning("serving %s with no users (--insecure): anyone on the network can use Clair", cfg.host)
        return
    raise ConfigError(
        f"Clair will not serve {cfg.host} (other machines can reach it) without users: anyone there could "
        f"use it. Add one first with `python app.py adduser NAME` (users file: {users.path}), then start "
        "Clair again; or pass --insecure to serve with no login."
    )


def check_port(host: str, port: int, setting: str = "--port") -> None:
    """Refuse a port that is taken before torch and Gradio load (tens of seconds), with what to do instead."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no owner
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"Port {port} on {host} is in use: another Clair, or another program (`ss -ltnp 'sport = :{port}'` "
                    f"names it). Stop it, or pick another port: {setting} {port + 1 if port < 65535 else 8000}."
                ) from None
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    f"Port {port} needs root privileges (ports below 1024 do): pick one above 1023 with {setting}."
                ) from None
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
                raise ConfigError(
                    f"CLAIR_HOST={host} is not an address of this machine: use 127.0.0.1 (this machine only) or "
                    "--listen (every interface)."
                ) from None
            raise ConfigError(f"Clair cannot serve on {host}:{port}: {exc.strerror or exc}.") from None


def preflight(cfg: config.Config) -> None:
    """What can be checked without torch or Gradio, checked first, so a mistake is answered in a moment:
    users for a LAN address, and the ports."""
    check_exposure(cfg, users_mod.Users(cfg.users_path))
    check_port(cfg.host, cfg.port)
    if cfg.ollama_port:
        check_port(cfg.host, cfg.ollama_port, "CLAIR_OLLAMA_PORT=")


HUB = "https://huggingface.co"
HUB_PROBE_S = 2.0  # how long start-up waits to learn whether the hub answers (only when a model comes from it)


def _hub_models(cfg: config.Config) -> list[tuple[str, str, str]]:
    """(hub id, a file every copy of it has, what Clair uses it for) for the models that would come from the
    Hugging Face hub: not `tiny`, not a local folder."""
    wanted = [(cfg.image_model, "model_index.json", "the image model (--image-model)")]
    if cfg.chat_backend != "ollama":
        use = "the in-process chat model (--local-chat-model)" + (
            ", used when Ollama does not answer" if cfg.chat_backend == "auto" else ""
        )
        wanted.append((cfg.local_chat_model, "config.json", use))
    if cfg.vae.lower() == "fp16-fix":
        wanted.append(("madebyollin/sdxl-vae-fp16-fix", "config.json", "the fp16-safe VAE (CLAIR_VAE=fp16-fix)"))
    return [(m, f, use) for m, f, use in wanted if m != "tiny" and "/" in m and not os.path.exists(os.path.expanduser(m))]


def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_S) -> bool:
    """Can a TCP connection to the hub be opened within `timeout`? (Name lookup included: run in a thread, as
    a resolver may stall offline.)"""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    done: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                done.append(True)
        except OSError:
            done.append(False)

    t = threading.Thread(target=probe, name="clair-hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    return bool(done and done[0])


def go_offline_if_the_hub_is_unreachable(cfg: config.Config, environ=os.environ) -> str | None:
    """Without a network the Hugging Face client retries every file for 20-80 s before it falls back to its
    cache, and logs each retry. When a model would come from the hub and the hub does not answer, Clair sets
    HF_HUB_OFFLINE=1 before the client is imported (it reads it once), so loads use the cache at once, and
    says once what is missing from the cache and how to get it. Returns that message (None: nothing to say)."""
    if cfg.demo or environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    models = _hub_models(cfg)
    if not models:
        return None
    endpoint = environ.get("HF_ENDPOINT", "").strip() or HUB
    if hub_reachable(endpoint):
        return None
    environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import try_to_load_from_cache  # after the variable is set: it is read at import

    missing = [(m, use) for m, marker, use in models if not isinstance(try_to_load_from_cache(m, marker), str)]
    text = f"{endpoint} cannot be reached, so Clair loads models from the Hugging Face cache only (HF_HUB_OFFLINE=1)."
    if not missing:
        return text + " Everything it needs is there."
    names = "; ".join(f"{m} ({use})" for m, use in missing)
    return (
        f"{text} Missing there: {names}. Requests that need them are refused at once with this reason. To get them: "
        f"connect this machine and restart Clair, or run `huggingface-cli download NAME` on a connected machine and "
        "copy its ~/.cache/huggingface here, or point the setting at a local folder. For chat, Ollama needs no "
        "download from Hugging Face (https://ollama.com/download, then `ollama pull llama3.1:8b`). Or try "
        "`clair --demo`."
    )


def _url(scheme: str, host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


# While preloading, each EXTEND_TIMEOUT_USEC gives systemd's start timeout this much more from now
# (sd_notify(3): the next message must come within it), sent every EXTEND_EVERY_S. A preload that runs past
# PRELOAD_LIMIT_S (a stuck download) stops holding the start back: READY=1 goes out and the tabs show the load.
EXTEND_S = 90.0
EXTEND_EVERY_S = 30.0
PRELOAD_LIMIT_S = 3600.0


def _preload_then_ready(studio, url: str) -> None:
    done = threading.Event()

    def preload() -> None:
        try:
            studio.preload()
        finally:
            done.set()

    t0 = time.monotonic()
    sdnotify.notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_S * 1e6)}\nSTATUS=serving on {url}; loading the models")
    threading.Thread(target=preload, name="clair-preload-load", daemon=True).start()
    while not done.wait(EXTEND_EVERY_S):
        if time.monotonic() - t0 > PRELOAD_LIMIT_S:
            log.warning("models still loading after %.0f s; telling systemd Clair is ready anyway", PRELOAD_LIMIT_S)
            break
        sdnotify.extend_timeout(EXTEND_S)
    log.info("ready preload_s=%.2f", time.monotonic() - t0)
    sdnotify.ready(f"serving on {url}")


def _warn_without_cuda(cfg: config.Config) -> None:
    from clair.device import gpu

    if cfg.workers == "on":
        return  # this process never looks at CUDA then: each worker says it itself (clair/engines/worker_main.py)
    models = [cfg.image_model] + ([cfg.local_chat_model] if cfg.chat_backend != "ollama" else [])
    real = [m for m in models if m != "tiny"]
    if real and not cfg.demo and not gpu.cuda():
        log.warning(
            "no CUDA device: the real models (%s) will run on the CPU, a render takes minutes. Check the NVIDIA "
            "driver and that torch is a CUDA build (`python -c 'import torch; print(torch.cuda.is_available())'`), "
            "or run with --demo",
            ", ".join(real),
        )


def serve(cfg: config.Config, ready: threading.Event | None = None, stop: threading.Event | None = None):
    """Serve until `stop` is set (or SIGINT/SIGTERM in the main thread). Returns the studio."""
    from clair.adapters.ui import build
    from clair.edge.users import Users
    from clair.edge.web import install_log_filter
    from clair.service.studio import Studio

    users = Users(cfg.users_path)
    check_exposure(cfg, users)
    install_log_filter()
    studio = Studio(cfg)
    demo = build(studio)
    app = make_app(studio, demo, users)
    server, thread = _start_server(cfg, app)
    gateway = None
    if cfg.ollama_port:
        gateway = serve_gateway(cfg, studio, app.state.web)
    scheme = "https" if cfg.tls_cert else "http"
    url = _url(scheme, cfg.host, cfg.port)
    _announce(cfg, studio, users, url, scheme)
    if cfg.preload:
        # READY=1 only once the models are in host memory; until then systemd's start timeout is extended.
        threading.Thread(target=_preload_then_ready, args=(studio, url), name="clair-preload", daemon=True).start()
    else:
        sdnotify.ready(f"serving on {url}")
    watchdog = _start_watchdog(url)
    if ready is not None:
        ready.set()
    stop = stop or threading.Event()
    try:
        while thread.is_alive() and not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sdnotify.stopping()
        if watchdog is not None:
            watchdog.stop()
        server.should_exit = True
        if gateway is not None:
            gateway[0].should_exit = True
            gateway[1].join(10)
        thread.join(10)
    return studio


def _start_server(cfg: config.Config, app):
    """Start uvicorn on its own thread and wait until it listens. Returns (server, thread)."""
    import uvicorn

    from clair.edge.web import server_limits

    tls = {"ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key} if cfg.tls_cert else {}
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            log_config=None,  # uvicorn's records go through Clair's handlers (and their flood filter)
            timeout_graceful_shutdown=5,
            **server_limits(cfg),  # connections per machine, kept for loopback, X-Forwarded-For from proxies only
            server_header=False,
            **tls,
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(
                f"Clair could not start serving on {cfg.host}:{cfg.port} (is the port in use? --port picks another)."
            )
        time.sleep(0.05)
    return server, thread


def _announce(cfg: config.Config, studio, users, url: str, scheme: str) -> None:
    """Say where Clair serves (the log, the terminal, its LAN addresses), who may log in, and what to fix."""
    from clair.edge.web import lan_urls

    log.info(
        "serving url=%s demo=%s policy=%s budget_gb=%s", url, cfg.demo, cfg.gpu_policy, studio.status()["budget_gb"]
    )
    print(f"Clair is running at {url}  (Ctrl+C to stop)", flush=True)
    for lan in lan_urls(cfg.host, cfg.port, scheme):
        print(f"  on the LAN: {lan}", flush=True)
    names = users.names()
    if names:
        print(f"  users: {', '.join(names)}  (python app.py adduser NAME adds one)", flush=True)
    if not cfg.loopback_only and not cfg.tls_cert:
        log.warning(
            "passwords cross the LAN unencrypted: set CLAIR_TLS_CERT and CLAIR_TLS_KEY, or serve Clair "
            "behind a TLS reverse proxy (docs/install.md)"
        )
    _warn_without_cuda(cfg)


def _start_watchdog(url: str):
    """systemd's watchdog (WatchdogSec=), fed while /healthz answers 200; None when systemd asks for none."""
    interval = sdnotify.watchdog_interval()
    if not interval:
        return None

    def check() -> bool:
        status, body = healthz(url, timeout=max(1.0, interval / 2))
        if status == 200:
            return True
        if status is None:
            return False
        try:  # 503: the reason goes to `systemctl status` (STATUS=)
            problem = json.loads(body).get("problem")
        except Exception:
            problem = None
        raise RuntimeError(problem or f"/healthz answered {status}")

    return sdnotify.Watchdog(check, interval).start()


def healthz(url: str, timeout: float) -> tuple[int | None, bytes]:
    """GET our own /healthz: (status, body), or (None, b"") when it could not be asked.

    On IPv4 loopback the request comes from WATCHDOG_SOURCE, which the connection limits let past the per-machine
    cap (clair.edge.web.guarded_protocol): loopback is one machine there, and a local client, or LAN clients
    behind a reverse proxy Clair was not told to trust, holding that machine's quarter of the connections must
    not shut the watchdog out (systemd would restart Clair, and everyone's work with it).
    """
    import http.client
    from urllib.parse import urlsplit

    from clair.edge.web import WATCHDOG_SOURCE

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    source = (WATCHDOG_SOURCE, 0) if host == "127.0.0.1" else None
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # our own server, on loopback
    for src in (source, None) if source else (None,):  # not every system routes all of 127/8 (macOS does not)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, source_address=src, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=src)
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            return resp.status, resp.read(64 * 1024)
        except OSError as exc:
            if src is not None and getattr(exc, "errno", None) == errno.EADDRNOTAVAIL:
                continue
            return None, b""
        except Exception:
            return None, b""
        finally:
            conn.close()
    return None, b""


def serve_gateway(cfg: config.Config, studio, web):
    """The Ollama-compatible API (clair/adapters/gateway.py) on CLAIR_OLLAMA_PORT, bound like Clair, plain HTTP
    (as Ollama's clients expect). Returns (server, thread)."""
    import uvicorn

    from clair.adapters.gateway import Gateway
    from clair.edge.access import AccessLog
    from clair.edge.web import server_limits

    server = uvicorn.Server(
        uvicorn.Config(
            AccessLog(Gateway(studio, web).app(), web, "ollama"),  # one line per request (clair/edge/access.py)
            host=cfg.host,
            port=cfg.ollama_port,
            log_level="warning",
            log_config=None,
            timeout_graceful_shutdown=5,
            **server_limits(cfg),
            server_header=False,
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn-ollama", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(
                f"Clair could not serve its Ollama-compatible API on {cfg.host}:{cfg.ollama_port} (is the port in "
                "use? Ollama itself may still listen there: docs/gateway.md)."
            )
        time.sleep(0.05)
    print(f"  Ollama-compatible API: {_url('http', cfg.host, cfg.ollama_port)}  (OLLAMA_HOST for other programs)", flush=True)
    if not cfg.loopback_only:
        log.warning("the Ollama-compatible port is plain HTTP: API keys cross the LAN unencrypted")
    return server, thread


def main(argv: list[str] | None = None) -> int:
    # CUDA allocator (issue 11): before anything imports torch or touches CUDA; see clair/device/allocator.py.
    alloc_var, alloc_conf = allocator.apply()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in users_mod.COMMANDS + keys_mod.COMMANDS:
        return user_command(argv)
    try:
        cfg = config.load(argv)
        preflight(cfg)
    except (ConfigError, users_mod.UserError) as exc:
        print(f"clair: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    log.info("cuda allocator %s=%s", alloc_var, alloc_conf)
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.log_level != "DEBUG":
        # Offline, the hub client logs every retry of every file (twice: its own handler and ours); Clair
        # explains the failure once (clair/engines/loadgate.py).
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    offline = go_offline_if_the_hub_is_unreachable(cfg)  # before anything imports the Hugging Face client
    if offline:
        log.warning("%s", offline)
    faulthandler.enable()  # a watchdog abort prints every thread's stack to the journal
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        serve(cfg)
    except (ConfigError, users_mod.UserError) as exc:
        print(f"clair: {exc}", file=sys.stderr)
        return 2
    return 0


def user_command(argv: list[str]) -> int:
    """`adduser NAME`, `deluser NAME`, `users`, `addkey NAME`, `delkey NAME`, `keys`; other flags (--users-file, --output-dir) as for serving."""
    import argparse

    p = argparse.ArgumentParser(prog=f"app.py {argv[0]}", add_help=True)
    if argv[0] not in ("users", "keys"):
        p.add_argument("name")
    args, rest = p.parse_known_args(argv[1:])
    try:
        cfg = config.load(rest)
        users = users_mod.Users(cfg.users_path)
        keys = keys_mod.Keys(keys_mod.keys_path(cfg.users_path), users)  # bound to the user's entry
        if argv[0] == "addkey" and users.names() and args.name not in users.names():
            raise users_mod.UserError(
                f"There is no user {args.name!r}: a key acts for a user (their caps, their images). Add the user "
                f"first (`python app.py adduser {args.name}`), or name an existing one: {', '.join(users.names())}."
            )
        if argv[0] in keys_mod.COMMANDS:
            return keys_mod.command([argv[0], *([args.name] if argv[0] != "keys" else [])], keys)
        rc = users_mod.command([argv[0], *([args.name] if argv[0] != "users" else [])], users)
        if rc == 0 and argv[0] == "deluser" and args.name in keys.names():
            keys.delete(args.name)  # their API key goes with them, as their sessions do
            print(f"Removed {args.name}'s API key too.")
        return rc
    except (ConfigError, users_mod.UserError) as exc:
        print(f"clair: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, EOFError):
        print("\nclair: cancelled, nothing was changed.", file=sys.stderr)
        return 1
