"""Start-up: read the config, build the studio and the Gradio app, serve, and talk to systemd.

The web server is uvicorn with the Gradio app mounted at / beside a `/healthz` route (Gradio has no
health route of its own). READY=1 goes to systemd once the server accepts connections and the models are
preloaded into host memory (EXTEND_TIMEOUT_USEC keeps the start from timing out meanwhile); the watchdog
heartbeat is sent only while the health check passes (see Studio.health_problem: a stuck arbiter, or a GPU
holder without progress for CLAIR_STALL_S), so a wedged process is restarted.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from clair import config, sdnotify
from clair.errors import ConfigError

log = logging.getLogger("clair")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def make_app(studio, demo):
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    cfg = studio.cfg
    app = FastAPI(title="Clair")

    @app.get("/healthz")
    def healthz():
        ok = studio.healthy()
        problem = None if ok else studio.last_health_problem
        body = {"ok": ok, "holder": studio.arbiter.status()["holder"] if ok else None, "problem": problem}
        return JSONResponse(body, status_code=200 if ok else 503)

    auth = tuple(cfg.auth.split(":", 1)) if cfg.auth else None
    os.makedirs(studio.image.output_dir, exist_ok=True)
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        allowed_paths=[str(studio.image.output_dir)],
        show_error=True,
        footer_links=["api", "settings"],
        ssr_mode=False,
        favicon_path=str(ASSETS / "favicon.svg"),
        css_paths=[ASSETS / "clair.css"],
    )


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
    from clair import gpu

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
    import uvicorn

    from clair.studio import Studio
    from clair.ui import build

    studio = Studio(cfg)
    demo = build(studio)
    app = make_app(studio, demo)
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(f"Clair could not start serving on {cfg.host}:{cfg.port} (is the port in use?).")
        time.sleep(0.05)
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    log.info(
        "serving url=%s demo=%s policy=%s budget_gb=%s", url, cfg.demo, cfg.gpu_policy, studio.status()["budget_gb"]
    )
    print(f"Clair is running at {url}  (Ctrl+C to stop)", flush=True)
    _warn_without_cuda(cfg)
    if cfg.preload:
        # READY=1 only once the models are in host memory; until then systemd's start timeout is extended.
        threading.Thread(target=_preload_then_ready, args=(studio, url), name="clair-preload", daemon=True).start()
    else:
        sdnotify.ready(f"serving on {url}")
    watchdog = None
    interval = sdnotify.watchdog_interval()
    if interval:

        def check() -> bool:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=max(1.0, interval / 2)) as resp:
                    return resp.status == 200
            except urllib.error.HTTPError as err:  # 503: the reason goes to `systemctl status` (STATUS=)
                try:
                    problem = json.loads(err.read()).get("problem")
                except Exception:
                    problem = None
                raise RuntimeError(problem or f"/healthz answered {err.code}") from None
            except Exception:
                return False

        watchdog = sdnotify.Watchdog(check, interval).start()
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
        thread.join(10)
    return studio


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config.load(argv)
    except ConfigError as exc:
        print(f"clair: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.log_level != "DEBUG":
        # Offline, the hub client logs every retry of every file (twice: its own handler and ours); Clair
        # explains the failure once (clair/loadgate.py).
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    faulthandler.enable()  # a watchdog abort prints every thread's stack to the journal
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    serve(cfg)
    return 0
