"""The whole app (`python app.py --listen`, users, a key, CLAIR_OLLAMA_PORT) with the real `openai` and
`ollama` clients as other programs on the box use them; Ollama played by the stand-in. One app start."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import ollama
import openai
import pytest

from tests.ollama_standin import OllamaStandin
from tests.support import App, free_port, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama3.1:8b"
PASSWORD = "correct horse battery"


def app_py(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_keys_commands_and_both_apis_on_a_lan_app(tmp_path: Path) -> None:
    users_file = tmp_path / "users.json"
    assert app_py("adduser", "alice", "--users-file", str(users_file), stdin=PASSWORD + "\n").returncode == 0
    made = app_py("addkey", "alice", "--users-file", str(users_file))
    assert made.returncode == 0, made.stderr
    key = next(line for line in made.stdout.splitlines() if line.startswith("clair-"))
    keys_file = tmp_path / "keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert key not in keys_file.read_text()  # only its hash is stored
    listed = app_py("keys", "--users-file", str(users_file))
    assert listed.stdout.startswith("alice\t") and key not in listed.stdout

    with OllamaStandin({MODEL: 4.9}, unload_delay=0.1, token_delay=0.01) as standin:
        oport = free_port()
        env = {
            "CLAIR_USERS_FILE": str(users_file),
            "CLAIR_PRELOAD": "0",
            "OLLAMA_HOST": standin.host,
            "CLAIR_CHAT_BACKEND": "ollama",
            "CLAIR_OLLAMA_PORT": str(oport),
        }
        app = App(tmp_path, env, args=["--demo", "--listen"], auth=("alice", PASSWORD))
        try:
            assert f"Ollama-compatible API: http://127.0.0.1:{oport}" in app.log.read_text()
            # /v1 on the web port: the key is needed, and works.
            v1 = openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0, timeout=60)
            stream = v1.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream) == "You said: hi"
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=app.url + "/v1", api_key="clair-nope", max_retries=0).models.list()
            # The Ollama port, from this machine (no key needed: Ollama itself answers loopback).
            local = ollama.Client(host=f"http://127.0.0.1:{oport}")
            parts = [c.message.content for c in local.chat(model=MODEL, messages=[{"role": "user", "content": "yo"}], stream=True)]
            assert "".join(parts) == "You said: yo"
            assert [m.model for m in local.ps().models] == [MODEL]
            # /status shows what Ollama holds.
            wait_until(lambda: [m["model"] for m in app.status()["ollama_models"]] == [MODEL], timeout=5)
            # Revoked: refused from now on, no restart.
            assert app_py("delkey", "alice", "--users-file", str(users_file)).returncode == 0
            with pytest.raises(openai.AuthenticationError):
                v1.models.list()
        finally:
            app.stop()
    log = app.log.read_text()
    assert "gateway" in log  # each API request is logged
    assert key not in log
    # The access log: one line per request on both ports, refusals included, with whose it was.
    access = [line for line in log.splitlines() if " access method=" in line]
    assert any(
        "method=POST path='/v1/chat/completions' status=200 client=127.0.0.1 user=alice" in a and "port=web" in a
        for a in access
    ), access
    assert any("method=POST path='/api/chat' status=200 client=127.0.0.1" in a and "port=ollama" in a for a in access)
    assert any("path='/v1/models' status=401" in a and "user=-" in a for a in access), access
    finished = [line for line in log.splitlines() if "gateway chat" in line and "status=200" in line]
    assert finished and not any("(client gone)" in line for line in finished), finished  # it did not leave
