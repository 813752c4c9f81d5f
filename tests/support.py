"""Helpers shared by the tests that run the whole app: a free port, bounded waits, `python app.py`."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gradio_client import Client

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def hang_up(port: int) -> None:
    """Shut down every TCP connection this process holds to 127.0.0.1:`port` (whichever thread owns it:
    gradio_client's event-stream and heartbeat threads, an httpx pool). Their readers see the end of the stream."""
    import psutil

    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.fd < 0 or not conn.raddr or conn.raddr.port != port or conn.raddr.ip != "127.0.0.1":
            continue
        sock = socket.socket(fileno=conn.fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        finally:
            sock.detach()  # the descriptor stays its owner's to close


class App:
    """`python app.py` with the given settings; stopped (and its log shown on failure) at the end."""

    def __init__(self, tmp: Path, env: dict[str, str], args=(), auth: tuple[str, str] | None = None, tls=False):
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log = tmp / f"app-{self.port}.log"
        full_env = {
            **os.environ,
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",
            "CLAIR_PORT": str(self.port),
            "CLAIR_OUTPUT_DIR": str(tmp / "outputs"),
            "CLAIR_IMAGE_MODEL": "tiny",
            "CLAIR_LOCAL_CHAT_MODEL": "tiny",
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), *args],
            cwd=tmp,
            env=full_env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._up, timeout=90, interval=0.2)
        except TimeoutError:
            self.stop()
            raise AssertionError("app did not start:\n" + self.log.read_text()[-3000:]) from None
        self.client = Client(self.url, auth=auth, download_files=False, verbose=False, ssl_verify=not tls)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("app exited:\n" + self.log.read_text()[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # tests' self-signed certificates
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2, context=context) as r:
                return r.status == 200
        except OSError:
            return False

    def status(self) -> dict:
        return self.client.predict(api_name="/status")

    def render(self, **kw) -> tuple:
        args = {"prompt": "a lighthouse at dusk", "negative_prompt": "", "steps": 2, "guidance": 5.0}
        args |= {"width": 64, "height": 64, "seed": 7} | kw
        return self.client.predict(**args, api_name="/render")

    def stop(self):
        """SIGTERM, as systemd stops Clair, once this process's own connections to the app are closed: a
        gradio_client keeps its event stream open after its last job, and uvicorn waits out its graceful
        shutdown (5 s) for open streams. Nothing is in flight by now; the app's real shutdown path runs."""
        hang_up(self.port)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Raw:
    """Gradio's queue protocol by hand (POST /gradio_api/queue/join, then the SSE of /gradio_api/queue/data),
    from a chosen loopback source address, so one test can play several clients (Clair tells clients
    apart by address when there are no user accounts)."""

    def __init__(self, url: str, source: str = "127.0.0.1"):
        import httpx

        self.http = httpx.Client(
            base_url=url, timeout=120, transport=httpx.HTTPTransport(local_address=source, retries=0)
        )
        self.config = self.http.get("/config").json()

    def dep(self, fn: str) -> dict:
        """The dependency whose api_name is `fn` (private events too)."""
        return next(d for d in self.config["dependencies"] if d.get("api_name") == fn)

    def call(self, fn: str, data: list) -> dict:
        """Run one event to its end. Returns {"ok", "status", "error", "data", "messages"}."""
        import json
        import uuid

        dep = self.dep(fn)
        session = uuid.uuid4().hex[:12]
        trigger = dep["targets"][0][0] if dep.get("targets") else None
        body = {"data": data, "fn_index": dep["id"], "trigger_id": trigger, "session_hash": session}
        r = self.http.post("/gradio_api/queue/join", json=body)
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": r.text, "data": None, "messages": []}
        event_id = r.json()["event_id"]
        messages = []
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                messages.append(msg)
                if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                    out = msg.get("output") or {}
                    return {
                        "ok": bool(msg.get("success")),
                        "status": 200,
                        "error": out.get("error"),
                        "data": out.get("data"),
                        "messages": messages,
                    }
        return {"ok": False, "status": 200, "error": "stream ended", "data": None, "messages": messages}
