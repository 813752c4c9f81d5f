"""The real Open WebUI against Clair, set up as docs/clients.md says: chat over Clair's Ollama-compatible port and
over its /v1, an image through Open WebUI's images API (engine "openai", Clair's /v1), a chat sent while a render
runs, and the household caps counted per person (ENABLE_FORWARD_USER_INFO_HEADERS=true on Open WebUI's side,
CLAIR_FORWARDED_USERS_FROM=127.0.0.1 on Clair's: no users in the demo, so Open WebUI is trusted by address).

Open WebUI is a 3 GB install, so this runs only where its `open-webui` command is found: $OPEN_WEBUI_BIN (e.g.
`python3 -m venv /tmp/owui && /tmp/owui/bin/pip install open-webui==0.12.4`, then
`OPEN_WEBUI_BIN=/tmp/owui/bin/open-webui pytest tests/test_open_webui.py`) or `open-webui` on the PATH;
elsewhere it is skipped with that reason. (Not a CLAIR_ name: Clair refuses unknown CLAIR_ variables.)

Everything is loopback and offline: Ollama is the stand-in (tests/ollama_standin.py) behind Clair's gateway, Clair
runs `--demo` (tiny image model), and Open WebUI is told not to fetch anything (OFFLINE_MODE, no local embedding
model: its RAG engine is set to "ollama", which it only calls for documents). One start of each, shared by the
tests in order (module fixtures): Open WebUI alone takes ~50 s to start on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ollama_standin import OllamaStandin
from tests.support import App, free_port, wait_until

OPEN_WEBUI = os.environ.get("OPEN_WEBUI_BIN") or shutil.which("open-webui")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not OPEN_WEBUI or not os.access(OPEN_WEBUI, os.X_OK),
        reason="Open WebUI is not installed (a 3 GB install): set OPEN_WEBUI_BIN to its `open-webui` command "
        "(pip install open-webui==0.12.4 in a venv of its own) to run the Open WebUI tests",
    ),
]

# An 8B model (4.9 GB) beside the demo's image model (6.5 GiB) does not fit the 10 GB simulated card, so a render
# holds Open WebUI's chats back (the gate at work) instead of running them beside it.
MODEL = "llama3.1:8b"
PREFIX = "clair"  # the /v1 connection's prefix in Open WebUI: the same models are listed on both connections
STEPS = 20  # Open WebUI sends no steps; Clair's extension, through Open WebUI's IMAGES_OPENAI_API_PARAMS
PEOPLE = {"ada": "Ada", "bob": "Bob", "cy": "Cy"}  # ada signs up first: Open WebUI's admin


class Http:
    """JSON over loopback with a bearer token (standard library: the test needs no client of Open WebUI's)."""

    def __init__(self, base: str, token: str | None = None):
        self.base, self.token = base, token

    def call(self, method: str, path: str, body=None, timeout=300) -> tuple[int, object, bytes]:
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return status, parsed, raw

    def chat(self, model: str, text: str) -> tuple[int, object]:
        status, body, _ = self.call(
            "POST",
            "/api/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": text}], "stream": False},
        )
        return status, body


def reply(body) -> str:
    return body["choices"][0]["message"]["content"]


def metric(clair: App, name: str, kind: str) -> float:
    with urllib.request.urlopen(clair.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}\{{kind="{kind}"\}} ([0-9.]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("owui")
    timings: dict[str, float] = {}
    with OllamaStandin({MODEL: 4.9}, load_delay=0.2, unload_delay=0.1, token_delay=0.01) as standin:
        oport = free_port()
        t0 = time.monotonic()
        clair = App(
            tmp,
            {
                "OLLAMA_HOST": standin.host,
                "CLAIR_OLLAMA_PORT": str(oport),
                "CLAIR_FORWARDED_USERS_FROM": "127.0.0.1",
                "CLAIR_SIM_GPU_GB": "10",
                "CLAIR_PRELOAD": "0",
            },
            args=["--demo"],
        )
        timings["clair_start_s"] = time.monotonic() - t0
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        data = tmp / "webui-data"
        data.mkdir()
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("CLAIR_", "OLLAMA_", "OPENAI_", "IMAGE", "RAG_"))
        }
        env |= {
            "DATA_DIR": str(data),
            "WEBUI_SECRET_KEY": "test-only-secret",
            # Offline: no Hugging Face, no version check, no telemetry, no local embedding model to load.
            "OFFLINE_MODE": "True",
            "HF_HUB_OFFLINE": "1",
            "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
            "RAG_RERANKING_MODEL_AUTO_UPDATE": "False",
            "WHISPER_MODEL_AUTO_UPDATE": "False",
            "RAG_EMBEDDING_ENGINE": "ollama",
            "ENABLE_VERSION_UPDATE_CHECK": "false",
            "ANONYMIZED_TELEMETRY": "false",
            "DO_NOT_TRACK": "true",
            "SCARF_NO_ANALYTICS": "true",
            # The household may use the models Open WebUI lists (base models need an access grant otherwise).
            "BYPASS_MODEL_ACCESS_CONTROL": "True",
            # docs/clients.md's block, with this run's ports (no users in the demo: any key works).
            "OLLAMA_BASE_URL": f"http://127.0.0.1:{oport}",
            "OPENAI_API_BASE_URL": f"{clair.url}/v1",
            "OPENAI_API_KEY": "clair-any",
            "ENABLE_IMAGE_GENERATION": "true",
            "IMAGE_GENERATION_ENGINE": "openai",
            "IMAGES_OPENAI_API_BASE_URL": f"{clair.url}/v1",
            "IMAGES_OPENAI_API_KEY": "clair-any",
            "IMAGE_GENERATION_MODEL": "sdxl:tiny",
            "IMAGE_SIZE": "512x512",
            "IMAGES_OPENAI_API_PARAMS": json.dumps({"steps": STEPS}),
            "ENABLE_FORWARD_USER_INFO_HEADERS": "true",
        }
        log = tmp / "open-webui.log"
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [OPEN_WEBUI, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def up():
            assert proc.poll() is None, "open-webui exited:\n" + log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_until(up, timeout=300, interval=1)
            timings["open_webui_start_s"] = time.monotonic() - t0
            yield {"clair": clair, "url": url, "log": log, "standin": standin, "timings": timings, "tmp": tmp}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            clair.stop()
            print("timings:", {k: round(v, 1) for k, v in timings.items()})


@pytest.fixture(scope="module")
def people(stack):
    """Three Open WebUI users, each with a token: the first signup is the admin, who adds the other two."""
    url = stack["url"]
    status, body, raw = Http(url).call(
        "POST", "/api/v1/auths/signup", {"name": "Ada", "email": "ada@home.test", "password": "pw-ada-1234"}
    )
    assert status == 200, raw[:500]
    admin = Http(url, body["token"])
    tokens = {"ada": admin}
    for who, name in PEOPLE.items():
        if who == "ada":
            continue
        status, body, raw = admin.call(
            "POST",
            "/api/v1/auths/add",
            {"name": name, "email": f"{who}@home.test", "password": f"pw-{who}-1234", "role": "user"},
        )
        assert status == 200, raw[:500]
        status, body, raw = Http(url).call(
            "POST", "/api/v1/auths/signin", {"email": f"{who}@home.test", "password": f"pw-{who}-1234"}
        )
        assert status == 200, raw[:500]
        tokens[who] = Http(url, body["token"])
    # Both connections list the same chat model; the /v1 one gets a prefix, as set in Open WebUI's Admin
    # Settings, Connections (what this call does), so each is reachable by its own id.
    status, cfg, raw = admin.call("GET", "/openai/config")
    assert status == 200, raw[:500]
    cfg["OPENAI_API_CONFIGS"] = {"0": {"enable": True, "prefix_id": PREFIX}}
    status, _, raw = admin.call("POST", "/openai/config/update", cfg)
    assert status == 200, raw[:500]
    return tokens


def access_logged(stack, path: str, port: str, status: int = 200) -> bool:
    """Clair's access log has a line for the request (written just after the answer's last byte, so the
    client may have it before the line is written: waited for)."""

    def found():
        return any(
            " access method=" in line and f"path='{path}' status={status}" in line and f"port={port}" in line
            for line in stack["clair"].log.read_text().splitlines()
        )

    try:
        return wait_until(found, timeout=10, interval=0.1)
    except TimeoutError:
        return False


def test_models_on_both_connections(stack, people):
    status, body, raw = people["ada"].call("GET", "/api/models")
    assert status == 200, raw[:500]
    ids = {m["id"]: m.get("owned_by") for m in body["data"]}
    assert ids.get(MODEL) == "ollama", ids
    assert ids.get(f"{PREFIX}.{MODEL}") == "openai", ids


def test_chat_over_the_ollama_connection(stack, people):
    t0 = time.monotonic()
    status, body = people["bob"].chat(MODEL, "hello over ollama")
    stack["timings"]["chat_ollama_s"] = time.monotonic() - t0
    assert status == 200, body
    assert reply(body) == "You said: hello over ollama"
    assert access_logged(stack, "/api/chat", "ollama")


def test_chat_over_the_openai_connection(stack, people):
    t0 = time.monotonic()
    status, body = people["cy"].chat(f"{PREFIX}.{MODEL}", "hello over v1")
    stack["timings"]["chat_v1_s"] = time.monotonic() - t0
    assert status == 200, body
    assert reply(body) == "You said: hello over v1"
    assert access_logged(stack, "/v1/chat/completions", "web")


def test_the_image_model_is_refused_for_chat_with_clairs_words(stack, people):
    """Open WebUI lists every model a connection offers in its chat picker (it does not read /v1/models'
    owned_by "clair-image"); picked for a chat, Clair's refusal reaches the person."""
    status, body = people["cy"].chat(f"{PREFIX}.sdxl:tiny", "hello picture")
    assert status != 200, body
    assert "is Clair's image model" in json.dumps(body), body


def generate_image(who: Http) -> tuple[int, object]:
    status, body, _ = who.call("POST", "/api/v1/images/generations", {"prompt": "a lighthouse at dusk"})
    return status, body


def test_an_image(stack, people):
    outputs = Path(stack["tmp"]) / "outputs"
    before = set(outputs.glob("*.png")) if outputs.exists() else set()
    t0 = time.monotonic()
    status, body = generate_image(people["bob"])
    stack["timings"]["image_s"] = time.monotonic() - t0
    assert status == 200, body
    assert body and body[0]["url"].startswith("/api/v1/files/"), body
    status, _, png = people["bob"].call("GET", body[0]["url"])
    assert status == 200 and png.startswith(b"\x89PNG"), png[:100]
    made = set(outputs.glob("*.png")) - before
    assert len(made) == 1, made  # rendered by Clair, saved in its output folder
    assert access_logged(stack, "/v1/images/generations", "web")


def start_image(who: Http) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        result["status"], result["body"] = generate_image(who)
        result["done"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_a_chat_during_a_render(stack, people):
    """Ada's render is running when Cy's chat comes: Clair pauses the render at its next step for the chat
    (CLAIR_PREEMPT=always, the default; an 8B model does not fit beside it on this card), answers it, and the
    render resumes and finishes."""
    clair = stack["clair"]
    render, rendered = start_image(people["ada"])
    wait_until(lambda: metric(clair, "clair_gpu_holder", "render") >= 1, timeout=60, interval=0.1)
    paused_before = clair.log.read_text().count("render paused")
    t0 = time.monotonic()
    status, body = people["cy"].chat(MODEL, "during the render")
    stack["timings"]["chat_during_render_s"] = time.monotonic() - t0
    assert status == 200, body
    assert reply(body) == "You said: during the render"
    assert render.is_alive(), "the chat was answered after the render, not during it"
    render.join(300)
    assert rendered["status"] == 200, rendered
    log = clair.log.read_text()
    assert log.count("render paused") > paused_before, "the render was not paused for the chat"
    assert re.search(r"render done .* preemptions=[1-9]", log), "no render finished after a pause"


def test_household_caps_are_counted_per_person(stack, people):
    """Ada renders and sends three chats, Bob and Cy four each, all in flight at once (Ollama, the stand-in,
    holds each chat before its first token until the end): twelve jobs from one Open WebUI (one address, one
    key), none refused, because each person has CLAIR_MAX_JOBS_PER_USER (4) of their own. Bob's fifth is refused
    with a 429 that says whose requests were counted, relayed by Open WebUI to Bob."""
    clair, standin = stack["clair"], stack["standin"]
    sends = [("ada", n) for n in range(3)] + [(w, n) for w in ("bob", "cy") for n in range(4)]
    gates = [standin.hold(MODEL) for _ in sends]
    render, rendered = start_image(people["ada"])
    wait_until(lambda: metric(clair, "clair_gpu_holder", "render") >= 1, timeout=60, interval=0.1)
    results: list[tuple[str, int, object]] = []
    lock = threading.Lock()

    def chat(who: str, n: int):
        status, body = people[who].chat(MODEL, f"{who} {n}")
        with lock:
            results.append((who, status, body))

    threads = [threading.Thread(target=chat, args=s, daemon=True) for s in sends]
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()

        def in_flight():
            return metric(clair, "clair_gpu_holder", "chat") + metric(clair, "clair_queue_depth", "chat")

        wait_until(lambda: in_flight() >= len(sends), timeout=60, interval=0.1)
        stack["timings"]["household_in_flight_s"] = time.monotonic() - t0
        assert not results, results  # nobody refused, nobody answered yet
        assert render.is_alive()
        status, body = people["bob"].chat(MODEL, "bob 5")
        assert status == 429, body
        detail = body["detail"]
        assert "4 requests" in detail and "Counted: the requests of the one person" in detail, detail
        assert "X-OpenWebUI-User-Id" in detail and "127.0.0.1" in detail, detail
        print("Bob's fifth, as Open WebUI relays it:", status, detail)
    finally:
        for g in gates:
            g.release()
    for t in threads:
        t.join(300)
    render.join(300)
    stack["timings"]["household_all_done_s"] = time.monotonic() - t0
    assert rendered["status"] == 200, rendered
    refused = [(w, s, b) for w, s, b in results if s != 200]
    assert not refused, refused
    assert sorted(reply(b) for _, _, b in results) == sorted(f"You said: {w} {n}" for w, n in sends)
    # The person's id is only hashed into the counter's key: never in Clair's log.
    status, me, _ = people["bob"].call("GET", "/api/v1/auths/")
    assert status == 200 and me["id"] not in clair.log.read_text()
