"""Start-up: read the config, build the studio and the Gradio app, serve, and talk to systemd.

The web server is uvicorn with the Gradio app mounted at / beside a `/healthz` route (Gradio has no
health route of its own). READY=1 goes to systemd once the server accepts connections; the watchdog
heartbeat is sent only while the health check passes, so a wedged process is restarted.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
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
        body = {"ok": ok, "holder": studio.arbiter.status()["holder"] if ok else None}
        return JSONResponse(body, status_code=200 if ok else 503)

    auth = tuple(cfg.auth.split(":", 1)) if cfg.auth else None
    os.makedirs(studio.image.output_dir, exist_ok=True)
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        allowed_paths=[str(studio.image.output_dir)],
        show_error=False,  # only gr.Error (Clair's own messages) reach clients; see docs/design.md
        footer_links=["api", "settings"],
        ssr_mode=False,
        favicon_path=str(ASSETS / "favicon.svg"),
        css_paths=[ASSETS / "clair.css"],
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
    sdnotify.ready(f"serving on {url}")
    if cfg.preload:
        threading.Thread(target=studio.preload, name="clair-preload", daemon=True).start()
    watchdog = None
    interval = sdnotify.watchdog_interval()
    if interval:

        def check() -> bool:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=max(1.0, interval / 2)) as resp:
                    return resp.status == 200
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
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    faulthandler.enable()  # a watchdog abort prints every thread's stack to the journal
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    serve(cfg)
    return 0
