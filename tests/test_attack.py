"""Attack tests: through Gradio's real HTTP protocol, try to make any event hand back a file it was not given.

Every dependency listed in `/config` is driven through `POST /gradio_api/queue/join` + the SSE stream of
`/gradio_api/queue/data` (and `POST /gradio_api/run/predict` for the unqueued ones, as the browser does),
with file references in every shape Gradio accepts for each input type. A new event is covered without
touching this file; an input type it has no payloads for fails the test, so the table is kept complete.

Two files are aimed at: a secret the server can read (in the app's working directory, inside the system temp
directory: both places Gradio itself would serve returned files from) and a file the attacker uploaded
(allowed as an input, but handing it back would still be returning the client's structure). Neither may
come back: not in any output, not through `/gradio_api/file=`, and the secret must never be copied into
Gradio's cache (which `/gradio_api/file=` serves).
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.parse
import uuid
from pathlib import Path

import httpx
import pytest

from tests.ollama_standin import OllamaStandin
from tests.support import App

pytestmark = pytest.mark.slow
MODEL = "llama3.1:8b"
SECRET = "TOP-SECRET-7f3c1e-do-not-serve"
UPLOADED = "ATTACKER-UPLOAD-51d2"
PNG = b"\x89PNG\r\n\x1a\n"


def fd(path: str, **extra) -> dict:
    """A Gradio FileData as a client sends it (the meta marker makes Gradio treat it as a file)."""
    return {"path": path, "meta": {"_type": "gradio.FileData"}, **extra}


def generic(ref: str) -> list:
    return [
        ref,
        fd(ref),
        [fd(ref)],
        {"type": "file", "file": fd(ref)},
        fd(ref, url=f"/gradio_api/file={ref}", orig_name="x.png"),
        {"nested": {"deeper": [fd(ref)]}},
    ]


def histories(ref: str) -> list:
    """Chat histories holding a file, in every shape Gradio's Chatbot (and a JSON history) accepts."""
    f = fd(ref)
    comp = {"type": "component", "constructor_args": {}, "props": {}}
    return [
        [{"role": "user", "content": [{"type": "file", "file": f}]}],
        [{"role": "user", "content": [{"type": "file", "file": f, "alt_text": "a"}]}],
        [{"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "file", "file": f}]}],
        [{"role": "user", "content": [{**comp, "component": "image", "value": f}]}],
        [{"role": "user", "content": [{**comp, "component": "file", "value": [f]}]}],
        [{"role": "user", "content": [{**comp, "component": "gallery", "value": [{"image": f, "caption": None}]}]}],
        [{"role": "user", "content": [{**comp, "component": "json", "value": {"x": f}}]}],
        [{"role": "user", "content": f}],
        [{"role": "user", "content": {"path": ref}}],
        [{"role": "user", "content": [f]}],
        [{"role": "user", "content": "hi", "metadata": {"title": "t"}}, {"role": "assistant", "content": f}],
    ]


def payloads(kind: str, ref: str) -> list:
    table = {
        "textbox": generic(ref),
        "dropdown": generic(ref),
        "slider": generic(ref),
        "number": generic(ref),
        "markdown": generic(ref),
        "json": generic(ref),
        "chatbot": histories(ref),
        "api": histories(ref) + generic(ref),
        "image": [fd(ref), fd(ref, url=f"/gradio_api/file={ref}"), ref, {"url": f"/gradio_api/file={ref}"}],
        "gallery": [[{"image": fd(ref), "caption": None}], [fd(ref)], [[fd(ref), "c"]], [ref]],
        "file": [fd(ref), [fd(ref)], ref],
        # gr.State lives on the server: whatever a client sends in its place must be ignored.
        "state": generic(ref) + histories(ref)[:3] + [[ref], [{"path": ref}]],
    }
    assert kind in table, f"no attack payloads for input type {kind!r}: add them to tests/test_attack.py"
    return table[kind]


def benign(comp: dict, index: int):
    """A harmless value for the inputs not under attack (cheap: the smallest render, a short message)."""
    kind, props = comp["type"], comp.get("props", {})
    if kind in ("textbox", "markdown"):
        return "hello"
    if kind == "dropdown":
        return MODEL
    if kind == "slider":
        return props.get("minimum", 0)
    if kind == "number":
        return props.get("value", -1)
    if kind == "chatbot":
        return []
    if kind == "json":
        return {}
    if kind == "api":
        return "hello" if index == 0 else []
    return None


class Attacker:
    def __init__(self, app: App):
        self.app = app
        self.http = httpx.Client(base_url=app.url, timeout=30)
        self.seen: list[str] = []  # every answer, raw

    def join(self, dep: dict, data: list) -> str:
        session = uuid.uuid4().hex[:12]
        trigger = dep["targets"][0][0] if dep.get("targets") else None
        body = {"data": data, "fn_index": dep["id"], "trigger_id": trigger, "session_hash": session}
        r = self.http.post("/gradio_api/queue/join", json=body)
        if r.status_code != 200:
            self.seen.append(r.text)
            return r.text
        event_id = r.json()["event_id"]
        text = []
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                text.append(line)
                msg = json.loads(line[5:])
                if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                    break
                if msg.get("msg") in ("close_stream", "unexpected_error"):
                    break
        self.seen.append("\n".join(text))
        return self.seen[-1]

    def predict(self, dep: dict, data: list) -> str:
        body = {"data": data, "fn_index": dep["id"], "session_hash": uuid.uuid4().hex[:12]}
        r = self.http.post("/gradio_api/run/predict", json=body)
        self.seen.append(r.text)
        return r.text

    def file_objects(self) -> list[dict]:
        """Every file object (a dict with a path or url) in the outputs of every answer."""
        found: list[dict] = []

        def walk(x):
            if isinstance(x, dict):
                if isinstance(x.get("path"), str) or isinstance(x.get("url"), str):
                    found.append(x)
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)

        for text in self.seen:
            for line in text.splitlines():
                try:
                    msg = json.loads(line[5:] if line.startswith("data:") else line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    walk(msg.get("output", {}).get("data") if "output" in msg else msg.get("data"))
        return found

    def fetch(self, url: str) -> bytes | None:
        url = url.split(self.app.url, 1)[-1]
        r = self.http.get(url)
        return r.content if r.status_code == 200 else None

    def urls_anywhere(self) -> set[str]:
        """Every /gradio_api/file= URL any answer mentions, even inside text."""
        return {m.group(0) for t in self.seen for m in re.finditer(r"/gradio_api/file=[^\s\"'\\)\]]+", t)}


@pytest.fixture(scope="module")
def standin():
    s = OllamaStandin({MODEL: 4.9}, token_delay=0.0)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def target(standin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack")
    secret = tmp / "clair.env"  # in the app's working directory, itself inside the system temp directory
    secret.write_text(f"CLAIR_AUTH=me:{SECRET}\n")
    cache = tmp / "gradio-cache"
    app = App(
        tmp,
        {
            "OLLAMA_HOST": standin.host,
            "CLAIR_CHAT_BACKEND": "ollama",
            "CLAIR_PRELOAD": "0",
            "CLAIR_WARMUP": "0",
            "GRADIO_TEMP_DIR": str(cache),
        },
    )
    yield app, secret, cache
    app.stop()


def _uploaded_ref(app: App) -> str | None:
    r = httpx.post(app.url + "/gradio_api/upload", files={"files": ("note.txt", UPLOADED.encode())}, timeout=10)
    if r.status_code == 403:
        return None  # Clair takes no uploads (clair/edge/web.py refuses the route): nothing uploaded to aim at
    r.raise_for_status()
    (path,) = r.json()
    return path


def test_no_event_hands_back_a_file_it_was_not_given(target):
    app, secret, cache = target
    attacker = Attacker(app)
    config = httpx.get(app.url + "/config", timeout=10).json()
    comps = {c["id"]: c for c in config["components"]}
    deps = config["dependencies"]
    assert len(deps) >= 20, "fewer events than the app registers: /config was not read right"
    refs = [ref for ref in (str(secret), _uploaded_ref(app)) if ref]

    calls = 0
    for dep in deps:
        inputs = [comps[i] for i in dep["inputs"]]
        send = [attacker.join] + ([attacker.predict] if dep.get("queue") is False else [])
        if not inputs:
            for how in send:
                how(dep, [])
                calls += 1
            continue
        for ref in refs:
            for i, comp in enumerate(inputs):
                for bad in payloads(comp["type"], ref):
                    data = [bad if j == i else benign(c, j) for j, c in enumerate(inputs)]
                    for how in send:
                        how(dep, data)
                        calls += 1
            # Every input attacked at once, too.
            for k in range(max(len(payloads(c["type"], ref)) for c in inputs)):
                data = [payloads(c["type"], ref)[k % len(payloads(c["type"], ref))] for c in inputs]
                attacker.join(dep, data)
                calls += 1

    everything = "\n".join(attacker.seen)
    assert calls > 200
    assert SECRET not in everything
    # Files the outputs hand back are Clair's own images, never the secret nor what the attacker sent.
    for obj in attacker.file_objects():
        url = obj.get("url") or f"/gradio_api/file={obj['path']}"
        content = attacker.fetch(url)
        assert content is not None and content.startswith(PNG), f"an output named {obj}, not one of Clair's images"
    # A path may come back as text (a message echoed in the chat), but it serves nothing secret.
    for url in attacker.urls_anywhere():
        assert SECRET.encode() not in (attacker.fetch(url) or b""), f"{url} served the secret"
    leaked = [p for p in cache.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the secret was copied into Gradio's cache (served by /gradio_api/file=): {leaked}"
    # The events that were fed sane values still work: a chat came through and a render was made.
    assert "You said: hello" in everything
    assert list((Path(app.log).parent / "outputs").glob("*.png"))


def test_file_routes_serve_only_outputs(target):
    app, secret, _ = target
    http = httpx.Client(base_url=app.url, timeout=10)
    outputs = Path(app.log).parent / "outputs"
    _, info = app.render()
    made = Path(info["path"])
    assert made.parent == outputs.resolve()
    assert http.get(f"/gradio_api/file={made}").content.startswith(PNG)  # Clair's own images are served
    s = str(secret)
    tries = [
        s,
        urllib.parse.quote(s),
        f"{outputs}/../{secret.name}",
        f"{outputs}/%2e%2e/{secret.name}",
        f"{outputs}/..%2f{secret.name}",
        f"{outputs}%2f..%2f{secret.name}",
        secret.name,
        f"../{secret.name}",
        "/etc/passwd",
        f"{outputs}/../../../../etc/passwd",
    ]
    for t in tries:
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            r = http.get(route + t)
            assert SECRET not in r.text and "root:" not in r.text, f"{route}{t} served a file"
    # Gradio fetches http(s) URLs named in the file route itself, but never from a private address (no way
    # in to loopback services through it).
    for url in (f"{app.url}/config", f"http://localhost:{app.port}/config"):
        r = http.get("/gradio_api/file=" + url)
        assert r.status_code != 200 and "dependencies" not in r.text, url


def test_inputs_gradio_refuses_get_clairs_words_not_gradios(target):
    """Gradio checks inputs against their components before Clair's handlers run; its own 400 text (pydantic's
    errors, server paths) must not reach the client: Clair's message with an error id does, the log has the rest."""
    app, secret, _ = target
    config = httpx.get(app.url + "/config", timeout=10).json()
    chat = next(d for d in config["dependencies"] if d.get("api_name") == "chat_ui")  # the Chatbot's own event
    bad_history = [{"role": "robot", "content": {"path": str(secret), "mime": 5}, "x": [1]}] * 50
    body = {"data": ["hi", bad_history, "", ""], "fn_index": chat["id"], "trigger_id": None, "session_hash": "attack400"}
    r = httpx.post(app.url + "/gradio_api/queue/join", json=body, timeout=30)
    assert r.status_code == 400, r.text  # Gradio's own check of the Chatbot's value, before Clair's handler
    text = r.text
    assert "Clair could not read this request" in text and "error id" in text
    assert "pydantic" not in text and str(secret.parent) not in text and "validation error" not in text
    assert secret.read_text() not in text
    assert "request refused before Clair's checks" in app.log.read_text()  # the details are in the log


def test_image_requests_refused_do_not_hand_back_what_was_sent():
    """/v1/images/generations said what was wrong by repeating the value sent: a `size` of any length (up to the
    body cap) came back whole, markup and all, and so did a nested `n` or a text `steps`."""
    from clair.adapters.openai_api import image_request
    from clair.base.config import Config
    from clair.base.errors import BadRequest

    echo = "<script>ECHO-" + "A" * 5000
    for bad in (
        {"size": echo},
        {"n": {"deep": [echo]}},
        {"n": [echo]},
        {"response_format": echo},
        {"steps": echo},
        {"guidance": [echo]},
        {"seed": {"x": echo}},
        {"n": 10**40},
    ):
        with pytest.raises(BadRequest) as err:
            image_request({"prompt": "a lighthouse", **bad}, Config())
        text = str(err.value)
        assert "ECHO" not in text and "<script>" not in text and len(text) < 200, text
        assert "must be" in text  # and it still says what to send


def _chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"


def test_a_body_in_tiny_pieces_is_refused_before_it_holds_the_event_loop():
    """Each h11 Data event costs the event loop ~5 us of Python, and uvicorn parses a whole read (up to 256 KB) in
    one go: 64 KB login forms in 1-byte chunks from 8 clients kept /healthz 3-5.7 s late. A body in tiny pieces
    is refused (400, with what to do) after TINY_PIECES of them; real clients' chunks pass."""
    import socket
    import threading
    from types import SimpleNamespace

    import uvicorn

    from clair.edge.web import TINY_PIECES, TINY_REFUSAL, server_limits
    from tests.support import free_port, wait_until

    got: list[int] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                got.append(-size)
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        got.append(size)
        body = str(size).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    limits = server_limits(SimpleNamespace(max_connections=64, trusted_proxies=""))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", **limits))
    threading.Thread(target=server.run, daemon=True).start()
    wait_until(lambda: server.started)

    def post(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            head = f"POST /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            with contextlib.suppress(OSError):  # the server may close while the rest is on its way
                s.sendall(head.encode() + raw)
            data = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    data += chunk
            return data

    try:
        answer = post(_chunked(b"a" * 65536, 1))
        assert answer.startswith(b"HTTP/1.1 400") and TINY_REFUSAL.encode() in answer, answer[:300]
        wait_until(lambda: got)  # the app sees the client gone, with what it had of the body
        assert got[-1] <= 0 and -got[-1] < 4 * TINY_PIECES, got  # it never had the body
        # Real clients: a small JSON in 8-byte chunks (fewer pieces than the threshold), 4 MB in 1 KB chunks.
        for body, size in ((b"b" * 1600, 8), (b"c" * 4 * 2**20, 1024)):
            answer = post(_chunked(body, size))
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(str(len(body)).encode()), answer[:300]
    finally:
        server.should_exit = True


def test_a_keep_alive_that_is_no_duration_is_not_handed_back():
    """The Ollama port answers a bad keep_alive in Go's words, which repeat the text: a 3 MB keep_alive came back
    whole (the port takes 64 MB bodies). Short ones keep Go's exact message; long ones are not repeated."""
    from clair.adapters.gateway import keep_alive_seconds

    with pytest.raises(ValueError) as err:
        keep_alive_seconds("5x")
    assert str(err.value) == 'time: invalid duration "5x"'
    with pytest.raises(ValueError) as err:
        keep_alive_seconds("ECHO" + "X" * 3_000_000)
    assert "ECHO" not in str(err.value) and len(str(err.value)) < 120 and str(err.value).startswith("time: invalid duration")
    assert keep_alive_seconds("1h2m3.5s") == 3723.5
