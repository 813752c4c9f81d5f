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
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
