"""The watchdog sees a hung GPU: the whole serving path (main.serve, /healthz, sdnotify) against a fake systemd.

A render whose denoising step hangs holds its lease without progress; after CLAIR_STALL_S /healthz answers 503
with the reason, the reason is logged, and no WATCHDOG=1 goes out (systemd would restart Clair). READY=1 comes
only after the models are preloaded, with EXTEND_TIMEOUT_USEC before it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clair import main
from clair.base.config import Config
from clair.engines.image import RenderParams
from tests.support import free_port


def _datagrams(sock: socket.socket, seconds: float) -> list[str]:
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


def _healthz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_a_hung_render_stops_the_heartbeat_and_ready_waits_for_the_preload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sock_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(sock_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a beat every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(main, "EXTEND_EVERY_S", 0.1)

    import clair.service.studio

    studios: list = []
    preload_done = threading.Event()

    class SlowPreload(clair.service.studio.Studio):
        def __init__(self, cfg):
            super().__init__(cfg)
            studios.append(self)

        def preload(self):
            time.sleep(0.6)  # a model load that takes a while
            super().preload()
            preload_done.set()

    monkeypatch.setattr(clair.service.studio, "Studio", SlowPreload)
    port = free_port()
    cfg = dataclasses.replace(
        Config(),
        port=port,
        image_model="tiny",
        local_chat_model="tiny",
        chat_backend="local",
        ollama_shares_gpu="no",
        output_dir=str(tmp_path / "out"),
        stall_s=0.8,
    )
    caplog.set_level(logging.INFO)
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=main.serve, args=(cfg, ready, stop), daemon=True)
    server.start()
    hang, hung = threading.Event(), threading.Event()
    try:
        assert ready.wait(60)
        url = f"http://127.0.0.1:{port}"

        # 1. Start-up: EXTEND_TIMEOUT_USEC while preloading, READY=1 only once it is done.
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while not any(m.startswith("READY=1") for m in seen) and time.monotonic() < deadline:
            got = _datagrams(systemd, 0.5)
            if any(m.startswith("READY=1") for m in got):
                assert preload_done.is_set()  # READY=1 only after the models were loaded
            seen += got
        ready_at = next(i for i, m in enumerate(seen) if m.startswith("READY=1"))
        extends = [m for m in seen[:ready_at] if "EXTEND_TIMEOUT_USEC=90000000" in m]
        assert len(extends) >= 2, seen  # the first at once, then every EXTEND_EVERY_S while loading
        studio = studios[0]
        assert studio.image._pipe is not None

        # 2. Healthy: heartbeats.
        assert "WATCHDOG=1" in _datagrams(systemd, 0.6)
        assert _healthz(url)[0] == 200

        # 3. A render hangs in a denoising step (a hung CUDA call would look the same).
        def on_progress(text: str, frac: float) -> None:
            if text.startswith("Step 1/"):
                hung.set()
                hang.wait(30)

        render = threading.Thread(
            target=studio.render,
            args=(RenderParams("x", steps=3, width=64, height=64, seed=1),),
            kwargs={"on_progress": on_progress},
            daemon=True,
        )
        render.start()
        assert hung.wait(30)
        # Progress stamped at step 1, then nothing: within CLAIR_STALL_S it is still healthy...
        assert _healthz(url)[0] == 200
        time.sleep(1.0)
        status, body = _healthz(url)
        assert status == 503
        assert "render 64x64 has held the GPU without progress" in body["problem"]
        # Heartbeats sent before the stall was noticed may still be queued: skip to the first unhealthy round.
        deadline = time.monotonic() + 10
        while not any(m.startswith("STATUS=unhealthy") for m in _datagrams(systemd, 0.3)):
            assert time.monotonic() < deadline, "the watchdog never reported the stall"
        systemd_view = _datagrams(systemd, 1.0)
        assert len(systemd_view) >= 3 and not [m for m in systemd_view if "WATCHDOG=1" in m], systemd_view
        assert all("has held the GPU without progress" in m for m in systemd_view), systemd_view
        assert "unhealthy: render 64x64 has held the GPU without progress" in caplog.text

        # 4. The step finishes: progress again, heartbeats again.
        hang.set()
        render.join(30)
        assert _healthz(url)[0] == 200
        assert any("WATCHDOG=1" in m for m in _datagrams(systemd, 1.0))
    finally:
        hang.set()
        stop.set()
        server.join(20)
        systemd.close()
