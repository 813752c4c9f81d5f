"""The one guard of every port (clair/edge/web.py `Guard`, clair/edge/guard.py), attacked as a LAN client would:
bodies of any size, chunked or not; JSON that is bad or nested deep; a body parsed while another client
asks /healthz; cookies under TLS; another user's Gradio session hash and files; keys of an earlier user;
and the files Clair keeps. Each test is named for the guard it checks and fails without it.

Servers are real uvicorn on loopback in a thread (tests/gateway_support.py), or the guard driven through
httpx's ASGI transport where a client address or TLS must be stamped on the request."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import stat
import threading
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from PIL import Image

from clair.adapters.gateway import over_limits
from clair.base.config import Config
from clair.edge import guard as edge
from clair.edge.keys import Keys, keys_path
from clair.edge.users import Users, command
from clair.edge.web import OLLAMA_PORT, Guard, Web
from clair.service.conversations import ConversationStore
from tests.gateway_support import Served, gateway_app, make_studio, v1_app
from tests.ollama_standin import OllamaStandin
from tests.support import wait_until

MODEL = "llama3.1:8b"
PASSWORD = "a long household password"


@pytest.fixture
def standin():
    s = OllamaStandin({MODEL: 4.9}, token_delay=0.0).start()
    yield s
    s.stop()


@pytest.fixture
def studio(standin, tmp_path):
    return make_studio(standin, tmp_path, preempt="off")


# --- bodies -------------------------------------------------------------------------------------------


def chunked_flood(port: int, path: str, total_mb: int) -> tuple[bytes, int]:
    """POST a chunked body of `total_mb` MiB (never a Content-Length) until the server answers or closes.
    Returns (the answer's first bytes, the MiB sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    mib = b"[" + b"1," * (512 * 1024 - 1) + b"1"  # 1 MiB of a JSON array that never closes
    chunk = f"{len(mib):x}\r\n".encode() + mib + b"\r\n"
    sent = 0
    s.settimeout(2)
    try:
        for _ in range(total_mb):
            s.sendall(chunk)
            sent += 1
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: it has answered, or closed
    s.settimeout(10)
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            part = s.recv(4096)
            if not part:
                break
            answer += part
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    return answer, sent


def test_body_caps_hold_while_reading_a_500mb_chunked_body_on_both_ports(studio):
    """/v1 and /api/chat on the Ollama port and /v1 on the web port: 413 once past the cap, memory flat."""
    me = psutil.Process()
    for app, path in ((gateway_app(studio), "/v1/chat/completions"), (gateway_app(studio), "/api/chat"), (v1_app(studio), "/v1/chat/completions")):
        served = Served(app)
        try:
            before = me.memory_info().rss
            answer, _sent = chunked_flood(served.port, path, 500)
            grew = me.memory_info().rss - before
        finally:
            served.stop()
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:200])
        assert grew < 120 * 2**20, f"{path}: memory grew {grew / 2**20:.0f} MiB"


def _scope(path: str, address: str, headers: dict[str, str]) -> dict:
    raw = [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:11435", **headers}.items()]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": raw,
        "client": (address, 50000), "server": ("127.0.0.1", 11435),
    }


async def _settled(predicate, timeout: float = 10.0) -> None:
    """Yield to the event loop's other tasks until `predicate()` holds (at most `timeout` s)."""

    async def spin() -> None:
        while not predicate():
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), timeout)


class Posts:
    """POSTs driven straight through a guard, concurrently, each body's parts after its first `early` ones held
    back until `go` is set: which were answered before their body was asked for (`reads`: how many times each
    called receive)."""

    def __init__(self, guard, body=b'{"model": "m", "messages": []}', parts: int = 1):
        self.guard, self.chunks = guard, [body] * parts
        self.go = asyncio.Event()
        self.status: dict[int, int] = {}
        self.text: dict[int, bytes] = {}
        self.reads: dict[int, int] = {}
        self.headers: dict[int, dict] = {}
        self.answered = asyncio.Condition()

    async def post(self, n: int, path: str, address: str, headers: dict[str, str], early: int = 0, chunks=None) -> None:
        self.reads[n] = 0
        chunks = self.chunks if chunks is None else chunks

        async def receive():
            self.reads[n] += 1
            if self.reads[n] > early:
                await self.go.wait()
            i = self.reads[n] - 1
            if i >= len(chunks):
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

        async def send(message):
            if message["type"] == "http.response.start":
                self.status[n] = message["status"]
                self.headers[n] = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                self.text[n] = self.text.get(n, b"") + message.get("body", b"")
                async with self.answered:
                    self.answered.notify_all()

        await self.guard(_scope(path, address, headers), receive, send)

    async def until_answered(self, count: int) -> None:
        async with self.answered:
            await asyncio.wait_for(self.answered.wait_for(lambda: len(self.status) >= count), 30)


def json_in_parts(*mib: float) -> list[bytes]:
    """A JSON body cut into parts of these sizes (MiB), as a large chat arrives: part by part."""
    sizes = [int(m * 2**20) for m in mib]
    head, tail = b'{"model": "m", "messages": [], "pad": "', b'"}'
    whole = head + b"x" * (sum(sizes) - len(head) - len(tail)) + tail
    out, at = [], 0
    for size in sizes:
        out.append(whole[at : at + size])
        at += size
    return out


def test_a_persons_gpu_requests_past_the_cap_are_refused_before_their_body_is_read(lan_web):
    """Sixteen 64 MB chats at once from one key took the process to 1.8 GB: each was read whole before the job
    slot refused it. Now the cap per person (CLAIR_MAX_JOBS_PER_USER, 4) counts a request before its body.
    (The body budget's share per person is set aside here: the next tests and the state machine check it.)"""
    lan_web.bodies = edge.BodyBudget(edge.BODY_BUDGET, share=edge.BODY_BUDGET)
    alice_key, _ = lan_web.keys.add("alice")
    bob_key, _ = lan_web.keys.add("bob")
    guard = Guard(_inner, lan_web, port=OLLAMA_PORT, max_body=64 * 2**20, gpu_paths=("/api/chat",))
    big = {"content-length": str(64 * 2**20), "content-type": "application/json"}

    async def go():
        posts = Posts(guard)
        tasks = [
            asyncio.create_task(posts.post(n, "/api/chat", "192.168.1.30", {**big, "authorization": f"Bearer {alice_key}"}))
            for n in range(16)
        ]
        await posts.until_answered(12)
        refused = sorted(n for n in posts.status)
        # Another person's chat is not held back by alice's cap nor by her large bodies.
        small = {"content-length": "30", "content-type": "application/json", "authorization": f"Bearer {bob_key}"}
        bob = asyncio.create_task(posts.post(99, "/api/chat", "192.168.1.31", small))
        # Yield to the guard until bob's body is asked for (or he is answered), and the refused have left.
        await _settled(lambda: (posts.reads.get(99, 0) or 99 in posts.status) and sum(lan_web.in_flight.count.values()) <= 5)
        assert dict(lan_web.in_flight.count) == {"user:alice": 4, "user:bob": 1}
        # Nothing is held for what a Content-Length promises: the budget counts bytes that have arrived.
        assert lan_web.bodies.held == 0
        posts.go.set()
        await asyncio.gather(*tasks, bob)
        return posts, refused

    posts, refused = _run(go())
    assert len(refused) == 12 and all(posts.status[n] == 429 for n in refused)
    assert all(posts.reads[n] == 0 for n in refused), "a refused request's body was read"
    message = json.loads(posts.text[refused[0]])["error"]
    assert "CLAIR_MAX_JOBS_PER_USER" in message and "the key of alice" in message
    assert posts.headers[refused[0]]["retry-after"] == "5"
    admitted = [n for n in posts.status if n not in refused]
    assert len(admitted) == 5 and all(posts.status[n] == 200 and posts.reads[n] == 1 for n in admitted)
    assert lan_web.in_flight.count == {} and lan_web.bodies.held == 0 and lan_web.bodies.per == {}  # all back


def test_one_persons_large_bodies_hold_half_the_budget_at_most(lan_web):
    """Two bodies of a person, part-way in, fill their share (half the budget) with the bytes that arrived: their
    third would pass it once whole, so it waits (503, unread: its Content-Length would not fit), while another
    person on the same machine still gets in: the share is the person's (a key's user), not the address's."""
    lan_web.bodies = edge.BodyBudget(32 * 2**20)  # a share of 16 MiB
    alice_key, _ = lan_web.keys.add("alice")
    bob_key, _ = lan_web.keys.add("bob")
    guard = Guard(_inner, lan_web, port=OLLAMA_PORT, max_body=64 * 2**20, gpu_paths=("/api/chat",))
    big = {"content-length": str(10 * 2**20), "content-type": "application/json"}
    parts = json_in_parts(7, 3)  # 8 MiB counted in all, 5 of them in the first part

    async def go():
        posts = Posts(guard)
        alice = [
            asyncio.create_task(
                posts.post(n, "/api/chat", "192.168.1.30", {**big, "authorization": f"Bearer {alice_key}"}, 1, parts)
            )
            for n in range(3)
        ]
        await posts.until_answered(1)
        bob = asyncio.create_task(
            posts.post(9, "/api/chat", "192.168.1.30", {**big, "authorization": f"Bearer {bob_key}"}, 1, parts)
        )
        await _settled(lambda: sum(posts.reads.values()) == 6)  # three first parts in, three waiting for the rest
        per = dict(lan_web.bodies.per)
        posts.go.set()
        await asyncio.gather(*alice, bob)
        return posts, per

    posts, per = _run(go())
    assert per == {"user:alice": 10 * 2**20, "user:bob": 5 * 2**20}
    assert sorted(posts.status[n] for n in range(3)) == [200, 200, 503] and posts.status[9] == 200
    (waited,) = [n for n in range(3) if posts.status[n] == 503]
    assert posts.reads[waited] == 0 and posts.headers[waited]["retry-after"] == "5"
    assert "at a time per person" in json.loads(posts.text[waited])["error"]
    assert lan_web.bodies.peak == 16 * 2**20 + 8 * 2**20  # alice's whole share, and bob's body
    assert lan_web.bodies.held == 0 and lan_web.bodies.per == {}


def test_bodies_held_at_once_stay_within_the_budget_and_the_excess_is_refused_unread(lan_web):
    """Many people's large bodies at once: past the BodyBudget a request is answered 503 + Retry-After, before
    its body is read (a Content-Length that would not fit beside the bytes held) or as soon as its chunks pass
    it (chunked)."""
    lan_web.bodies = edge.BodyBudget(10 * 2**20, share=10 * 2**20)  # one machine here: no share of its own
    guard = Guard(_inner, lan_web, port=OLLAMA_PORT, max_body=64 * 2**20)
    assert edge.BODY_FREE == 2 * 2**20  # each body's first 2 MB are not counted
    six_mb = {"content-length": str(6 * 2**20), "content-type": "application/json"}  # 4 MB counted once whole

    async def go():
        posts = Posts(guard)
        parts = json_in_parts(5.5, 0.5)  # 3.5 MB counted once the first part is in
        held = [asyncio.create_task(posts.post(n, "/api/show", "127.0.0.1", six_mb, 1, parts)) for n in range(2)]
        await _settled(lambda: sum(posts.reads.values()) >= 4)  # both first parts are in
        assert lan_web.bodies.held == 7 * 2**20
        await posts.post(2, "/api/show", "127.0.0.1", six_mb)  # 7 + 4 MB would be counted: refused at once
        chunked = Posts(guard, body=b"x" * 2**20, parts=8)  # 1 MB chunks, no Content-Length
        chunked.go.set()
        await chunked.post(3, "/api/show", "127.0.0.1", {"content-type": "application/json"})
        peak = lan_web.bodies.peak
        posts.go.set()
        await asyncio.gather(*held)
        return posts, chunked, peak

    posts, chunked, peak = _run(go())
    assert posts.status[2] == 503 and posts.reads[2] == 0 and posts.headers[2]["retry-after"] == "5"
    assert "try again" in json.loads(posts.text[2])["error"]
    assert chunked.status[3] == 503 and chunked.reads[3] == 6  # 2 free, 7 + 1 + 1 + 1 MB fit; the sixth does not
    assert [posts.status[0], posts.status[1]] == [200, 200]
    assert peak <= 10 * 2**20 and lan_web.bodies.held == 0


def test_on_the_ollama_port_only_a_gpu_request_may_carry_a_large_body(lan_web):
    """64 MB is for chats carrying images; /api/show (a model's name) and the refused management routes take
    text, so no other POST can hold the body budget with large bodies."""
    guard = Guard(_inner, lan_web, port=OLLAMA_PORT, max_body=64 * 2**20, gpu_paths=("/api/chat",))
    five_mb = {"content-length": str(5 * 2**20), "content-type": "application/json"}

    async def go():
        posts = Posts(guard)
        posts.go.set()
        for n, path in enumerate(("/api/show", "/api/pull", "/api/blobs/sha256-0", "/api/chat")):
            await posts.post(n, path, "127.0.0.1", five_mb)
        return posts

    posts = _run(go())
    assert [posts.status[n] for n in range(4)] == [413, 413, 413, 200]
    assert [posts.reads[n] for n in range(3)] == [0, 0, 0]


def test_the_ollama_ports_gpu_routes_count_a_person_before_reading(studio):
    """Through uvicorn and the Ollama-compatible app: a client past its cap is answered 429 while its body is
    still unsent, and the port answers others meanwhile. (30 MB bodies: four fit in a person's share of the
    body budget, so the cap is what refuses here.)"""
    from clair.adapters.gateway import Gateway

    web = Web(studio.cfg, Users(studio.cfg.users_path))
    served = Served(Gateway(studio, web).app())
    socks = []
    try:
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
            s.sendall(
                f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {30 * 2**20}\r\n\r\n".encode()
            )
            socks.append(s)
        answers = [b""] * len(socks)

        def read_ready() -> int:
            for i, s in enumerate(socks):
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answers[i] += s.recv(4096)
            return sum(a.startswith(b"HTTP/1.1 429") for a in answers)

        wait_until(lambda: read_ready() == 2 and sum(web.in_flight.count.values()) == 4)
        assert sum(a == b"" for a in answers) == 4  # the four within the cap wait for their bodies
        assert b"CLAIR_MAX_JOBS_PER_USER" in b"".join(answers) and studio.jobs.refused == 0  # no job slot was asked
        assert web.bodies.held == 0  # a Content-Length holds nothing: no byte of these bodies has come
        assert httpx.get(served.url + "/api/version", timeout=10).status_code == 200
        for s in socks:
            s.close()
        wait_until(lambda: not web.in_flight.count and web.bodies.held == 0)
    finally:
        for s in socks:
            s.close()
        served.stop()


def _declare(port: int, source: str, length: int, first: bytes) -> socket.socket:
    """A client at `source` (a loopback address: each is its own person here) that declares a body of `length`
    bytes, sends `first` of it and then nothing more for now."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(
        f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n".encode() + first
    )
    return s


def test_a_slow_body_holds_only_its_bytes_and_is_cut_when_it_crawls(studio):
    """The attack: two people each declare two 64 MB chats and send 3 MB of each, then crawl. Claimed from their
    Content-Length, these four held 248 MB of the 256 MB budget and a legitimate 20 MB image chat was answered
    503 for as long as they crawled (45 s and more). Counted as the bytes arrive, they hold 4 MB; the image chat
    goes through; and once a step of their bodies is late (past the first 2 MB, 2.5 MB within 5 s) each is
    refused 408 with what to do, and gives its bytes back."""
    from clair.adapters.gateway import Gateway

    web = Web(studio.cfg, Users(studio.cfg.users_path))
    served = Served(Gateway(studio, web).app())
    crawlers = []
    try:
        first = b'{"model": "' + b"x" * (3 * 2**20)
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"):
            crawlers.append(_declare(served.port, source, 64 * 2**20, first))
        wait_until(lambda: web.bodies.held == 4 * (len(first) - edge.BODY_FREE))
        image = "A" * (20 * 2**20)  # base64 of an image, as a vision client sends it
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "what is this?", "images": [image]}], "stream": False}
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4"), timeout=60) as client:
            r = client.post(served.url + "/api/chat", json=chat)
        assert r.status_code == 200 and r.json()["message"]["content"] == "You said: what is this?"
        answers = [b""] * len(crawlers)

        def refused() -> int:
            for i, c in enumerate(crawlers):
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answers[i] += c.recv(4096)
            return sum(a.startswith(b"HTTP/1.1 408") and b"too slowly" in a for a in answers)

        wait_until(lambda: refused() == 4 and web.bodies.held == 0, timeout=30)
        assert b"faster connection" in answers[0] and b"x" * 64 not in answers[0]
    finally:
        for c in crawlers:
            c.close()
        served.stop()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.integers(0, 3 * 2**20)), max_size=40))
def test_a_paced_body_never_holds_more_time_than_its_bytes_pay_for(arrivals):
    """Pace, on any arrivals (seconds since the last part, bytes). Each arrival it accepts has the body's counted
    bytes at least the minimum rate times the time since it passed its free part, less one step: holding
    budget costs bandwidth. One it refuses ends a gap of more than a window, begun when the body passed its free
    part or at an arrival, in which less than a step arrived. And a body that keeps the rate passes."""
    rate, window, free = 2**20, 2.0, 2 * 2**20
    pace = edge.Pace(rate, window, free)
    now, size, passed_at = 0.0, 0, None
    seen: list[tuple[float, int]] = []  # (time, size) after each accepted arrival past the free part
    for dt, n in arrivals:
        before = size
        now, size = now + dt, size + n
        if size > free and passed_at is None:
            passed_at = now
            seen.append((now, free))
        if not pace.moved(size, now):
            assert any(now - t > window and before - at < pace.step for t, at in seen)
            return
        assert passed_at is None or size - free >= rate * (now - passed_at) - pace.step
        if passed_at is not None:
            seen.append((now, size))
            assert pace.wait_s(now, 10.0) <= window + 1e-9
    steady = edge.Pace(rate, window, free)
    assert all(steady.moved(free + k * steady.step, k * window) for k in range(100))


def test_bad_and_deeply_nested_json_get_400_never_500(studio):
    web_v1, ollama = Served(v1_app(studio)), Served(gateway_app(studio))
    try:
        deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        bad = b'{"model": "m", "messages": [}'
        for url in (web_v1.url + "/v1/chat/completions", ollama.url + "/v1/chat/completions", ollama.url + "/api/chat"):
            huge = b'{"model": "m", "keep_alive": 1e400, "messages": [], "input": "x"}'  # a float that is infinity
            for body in (deep, bad, b"[" * 1_000_000, huge):
                r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
                assert r.status_code == 400, (url, r.status_code, r.text[:200])
                err = r.json()["error"]
                text = err if isinstance(err, str) else err["message"]
                assert "JSON" in text and "[[[" not in text
    finally:
        web_v1.stop()
        ollama.stop()


def test_json_nesting_and_size_limits():
    doc = b'{"a": "[[[[[[[[[[[[[[[[[[[[[", "b": [[1], {"c": [2]}]}'  # four levels: { [ { [
    assert edge.nesting(edge.parse_json(doc, limit=4)) == 4
    with pytest.raises(edge.BadJson, match="deeper than 3"):
        edge.parse_json(doc, limit=3)
    with pytest.raises(edge.BadJson, match="deeper"):
        edge.parse_json(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(edge.BadJson, match="values"):
        edge.parse_json(json.dumps([[1, 2]] * (edge.MAX_VALUES // 2 + 1)).encode())
    with pytest.raises(edge.BadJson, match="NaN"):
        edge.parse_json(b'{"x": NaN}')
    with pytest.raises(edge.BadJson, match="too large"):
        edge.parse_json(b'{"x": -1e400}')
    assert edge.nesting(7) == 0 and edge.nesting([]) == 1


def test_json_is_parsed_off_the_event_loop_so_healthz_answers_meanwhile(studio, monkeypatch):
    """A body being parsed must not hold other clients: the parse is held open here, /healthz still answers."""
    parsing, release = threading.Event(), threading.Event()
    real = edge.parse_json

    def slow_parse(raw, limit=edge.MAX_DEPTH):
        parsing.set()
        assert release.wait(30)
        return real(raw, limit)

    monkeypatch.setattr(edge, "parse_json", slow_parse)
    app = FastAPI()
    app.get("/healthz")(lambda: {"ok": True})
    from clair.adapters.openai_api import router

    app.include_router(router(studio))
    app.add_middleware(Guard, web=Web(studio.cfg, Users(studio.cfg.users_path)))
    served = Served(app)
    try:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 1_000_000}]})
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(served.url + "/v1/chat/completions", content=big, timeout=60)))
        t.start()
        assert parsing.wait(30)
        assert httpx.get(served.url + "/healthz", timeout=5).json() == {"ok": True}
        release.set()
        t.join(60)
        assert result["r"].status_code == 400  # over Clair's text limits, refused in OpenAI's shape
    finally:
        release.set()
        served.stop()


# --- text limits --------------------------------------------------------------------------------------


def test_text_limits_count_list_form_content_and_embed_input():
    cfg = Config()
    long = "x" * (cfg.max_history_chars + cfg.max_message_chars + 1)
    assert over_limits({"messages": [{"role": "user", "content": [{"type": "text", "text": long}]}]}, cfg)
    parts = [{"type": "text", "text": long[: len(long) // 2]}, {"type": "text", "text": long[len(long) // 2 :]}]
    assert over_limits({"messages": [{"role": "user", "content": parts}]}, cfg)
    assert over_limits({"model": "e", "input": long}, cfg)
    assert over_limits({"model": "e", "input": [long[:1000]] * (len(long) // 1000 + 1)}, cfg)
    assert over_limits({"prompt": [long]}, cfg) or over_limits({"prompt": long}, cfg)
    assert not over_limits({"model": "e", "input": ["short", "texts"]}, cfg)
    assert not over_limits({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, cfg)


def test_list_form_content_over_the_limit_is_refused_by_the_ollama_port(studio, standin):
    app = gateway_app(studio)
    long = "x" * (studio.cfg.max_history_chars + studio.cfg.max_message_chars + 1)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as c:
            chat = await c.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": long}]}]})
            embed = await c.post("/api/embed", json={"model": MODEL, "input": [long]})
            return chat, embed

    chat, embed = asyncio.run(go())
    assert chat.status_code == 400 and "too long" in chat.json()["error"]
    assert embed.status_code == 400 and "too long" in embed.json()["error"]
    assert not standin.requests_to("/api/chat") and not standin.requests_to("/api/embed")


# --- sessions, cookies, files -----------------------------------------------------------------------


async def _inner(scope, receive, send):
    """A stand-in for Gradio behind the guard: sets two cookies as Gradio's login does, echoes the path."""
    if scope["type"] != "http":
        return
    headers = [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"access-token-x=tok; HttpOnly; Path=/; SameSite=none; Secure"),
        (b"set-cookie", b"access-token-unsecure-x=tok; HttpOnly; Path=/"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


@pytest.fixture
def lan_web(tmp_path):
    users = Users(tmp_path / "users.json")
    users.set_password("alice", PASSWORD)
    users.set_password("bob", PASSWORD)
    cfg = Config(users_file=str(tmp_path / "users.json"), output_dir=str(tmp_path / "outputs"), host="0.0.0.0")
    web = Web(cfg, users)
    web.sessions["tok-alice"] = "alice"
    web.sessions["tok-bob"] = "bob"
    return web


def _as(web, user: str | None, scheme: str = "http") -> httpx.Client:
    cookies = {"access-token-unsecure-": f"tok-{user}"} if user else {}
    transport = httpx.ASGITransport(Guard(_inner, web), client=("192.168.1.30", 50000))
    return httpx.AsyncClient(transport=transport, base_url=f"{scheme}://127.0.0.1", cookies=cookies)


def _run(coro):
    return asyncio.run(coro)


def test_every_cookie_is_secure_under_tls(lan_web):
    async def go():
        async with _as(lan_web, "alice", "https") as c:
            return await c.get("/config")

    r = _run(go())
    cookies = r.headers.get_list("set-cookie")
    assert len(cookies) == 2 and all("; Secure" in v or "; secure" in v.lower() for v in cookies), cookies


def test_a_gradio_session_hash_is_worth_nothing_to_another_user(lan_web):
    async def go():
        async with _as(lan_web, "alice") as alice, _as(lan_web, "bob") as bob:
            mine = await alice.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "s3cr3t"})
            stream = await bob.get("/gradio_api/queue/data", params={"session_hash": "s3cr3t"})
            heartbeat = await bob.get("/gradio_api/heartbeat/s3cr3t")
            cancel = await bob.post("/gradio_api/cancel", json={"session_hash": "s3cr3t", "fn_index": 0, "event_id": "e"})
            state = await bob.post("/gradio_api/run/predict", json={"data": [], "fn_index": 0, "session_hash": "s3cr3t"})
            own = await alice.get("/gradio_api/queue/data", params={"session_hash": "s3cr3t"})
            return mine, stream, heartbeat, cancel, state, own

    mine, *others, own = _run(go())
    assert mine.status_code == 200 and own.status_code == 200
    assert [r.status_code for r in others] == [404, 404, 404, 404]


def alices_image(tmp_path):
    """(the output folder, a PNG in it that Clair's metadata says is alice's)."""
    from PIL.PngImagePlugin import PngInfo

    out = tmp_path / "outputs"
    out.mkdir()
    info = PngInfo()
    info.add_text("clair", json.dumps({"owner": "alice", "prompt": "p"}))
    path = out / "20260101-000000-1-p-abcdef.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return out, path


def test_file_route_serves_an_image_to_its_owner_only(lan_web, tmp_path):
    out, path = alices_image(tmp_path)

    # Gradio's copy of it in its cache (save_file_to_cache: the same bytes under <cache>/<hash>/<name>), and a
    # FIFO there, which the owner check must not open (it would wait for a writer forever).
    cache = tmp_path / "gradio" / ("0" * 64)
    cache.mkdir(parents=True)
    copy = cache / path.name
    copy.write_bytes(path.read_bytes())
    fifo = cache / "pipe.png"
    os.mkfifo(fifo)

    async def go():
        async with _as(lan_web, "alice") as alice, _as(lan_web, "bob") as bob:
            return [
                (await alice.get(f"/gradio_api/file={path}")).status_code,
                (await bob.get(f"/gradio_api/file={path}")).status_code,
                (await bob.get(f"/gradio_api/file/{path}")).status_code,
                (await bob.get(f"/gradio_api/file={out}/../outputs/{path.name}")).status_code,
                (await alice.get(f"/gradio_api/file={copy}")).status_code,
                (await bob.get(f"/gradio_api/file={copy}")).status_code,
                (await bob.get(f"/gradio_api/file/{cache}/../{cache.name}/{copy.name}")).status_code,
                (await bob.get(f"/gradio_api/file={fifo}")).status_code,  # not an image of Clair's: Gradio decides
            ]

    assert _run(go()) == [200, 404, 404, 404, 200, 404, 404, 200]


def test_another_users_image_and_a_missing_file_get_the_same_answer(lan_web, tmp_path):
    """Behind the guard, real Gradio's file route: another user's image was 404 (the guard) and a missing file
    403 (Gradio: "File not allowed: <the path>"), so the status told bob which of alice's file names exist.
    Now a missing file, one outside the allowed folder and alice's image answer bob alike, and never with the
    path he sent."""
    import gradio as gr

    out, path = alices_image(tmp_path)
    with gr.Blocks() as blocks:
        gr.Markdown("x")
    app = gr.mount_gradio_app(FastAPI(), blocks, path="/", allowed_paths=[str(out)])
    guard = Guard(app, lan_web)

    async def go():
        transport = httpx.ASGITransport(guard, client=("192.168.1.30", 50000))
        got = {}
        for user in ("alice", "bob"):
            cookies = {"access-token-unsecure-": f"tok-{user}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", cookies=cookies) as c:
                for name, target in (("theirs", path), ("missing", out / "20260101-000000-2-p-fedcba.png"), ("outside", "/etc/hostname")):
                    for route in ("/gradio_api/file=", "/gradio_api/file/"):
                        r = await c.get(route + str(target))
                        h = await c.head(route + str(target))
                        got[user, name, route] = (r.status_code, r.content, r.headers.get("content-type"), h.status_code)
        return got

    got = _run(go())
    assert got["alice", "theirs", "/gradio_api/file="][0] == 200
    answers = {v for (user, name, _), v in got.items() if user == "bob" or name != "theirs"}
    assert answers == {(404, b'{"detail": "No such file."}', "application/json", 404)}, answers


# --- keys ------------------------------------------------------------------------------------------


def test_a_readded_name_and_a_new_password_get_nothing_of_the_old_key(tmp_path):
    from starlette.datastructures import Headers

    users = Users(tmp_path / "users.json")
    users.set_password("carol", PASSWORD)
    users.set_password("dave", PASSWORD)
    cfg = Config(users_file=str(tmp_path / "users.json"))
    web = Web(cfg, users)
    key, _ = web.keys.add("carol")

    def who() -> str | None:
        return web.api_key_check(Headers({"authorization": f"Bearer {key}"}), "10.0.0.9").user

    assert who() == "carol"
    # Removed any way but `deluser` (the users file edited by hand), then added again under the same name.
    data = json.loads((tmp_path / "users.json").read_text())
    del data["users"]["carol"]
    (tmp_path / "users.json").write_text(json.dumps(data))
    users.set_password("carol", "another password 2")
    assert who() is None
    # A password reset through the command revokes the key and says so.
    new_key, _ = Keys(keys_path(tmp_path / "users.json"), users).add("carol")
    assert who() is None  # the old key stays dead
    assert web.api_key_check(Headers({"authorization": f"Bearer {new_key}"}), "10.0.0.9").user == "carol"
    import io

    out = io.StringIO()
    command(["adduser", "carol"], users, out=out, stdin=io.StringIO("a third password\n"))
    assert "Revoked carol's API key" in out.getvalue() and "addkey carol" in out.getvalue()
    assert web.api_key_check(Headers({"authorization": f"Bearer {new_key}"}), "10.0.0.9").user is None
    assert "carol" not in Keys(keys_path(tmp_path / "users.json")).names()


# --- files Clair keeps -------------------------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_conversations_are_private_and_not_named_by_a_plain_hash(tmp_path):
    store = ConversationStore(Config(), root=tmp_path / "chats")
    cid = store.save("alice", None, [{"role": "user", "content": "hello"}])
    (folder,) = [p for p in (tmp_path / "chats").iterdir() if p.is_dir()]
    assert folder.name != "user-" + hashlib.sha256(b"alice").hexdigest()[:32]
    assert _mode(folder) == 0o700 and _mode(tmp_path / "chats") == 0o700
    assert _mode(folder / f"{cid}.json") == 0o600
    assert ConversationStore(Config(), root=tmp_path / "chats").load("alice", cid)  # the same name after a restart


def test_output_images_and_state_are_created_private(studio, tmp_path):
    from clair.engines.image import RenderParams

    path, _ = studio.render(RenderParams("a private picture", steps=1, width=64, height=64), owner="alice")
    assert _mode(Path(path)) == 0o600 and _mode(Path(path).parent) == 0o700
    from clair.engines.base import StateFile

    state = StateFile(tmp_path / "state" / "clair-state.json")
    state.put("ollama", "m", 1)
    assert _mode(tmp_path / "state" / "clair-state.json") == 0o600


def test_users_and_keys_files_are_0600(tmp_path):
    users = Users(tmp_path / "x" / "users.json")
    users.set_password("erin", PASSWORD)
    Keys(keys_path(users.path), users).add("erin")
    assert _mode(tmp_path / "x" / "users.json") == 0o600 and _mode(tmp_path / "x" / "keys.json") == 0o600
    assert _mode(tmp_path / "x") == 0o700
    assert not [p for p in (tmp_path / "x").iterdir() if p.name.endswith(".tmp")]
    assert os.path.exists(keys_path(users.path))


def test_the_ollama_port_guard_is_the_web_guard():
    from clair.adapters import gateway

    assert not hasattr(gateway, "GatewayGuard")
    assert OLLAMA_PORT == "ollama"


def test_gradio_routes_take_bodies_no_larger_than_their_texts_need(lan_web):
    """Gradio parses and checks a body on the event loop (an 8 MB one held other clients for seconds): its
    routes take what Clair's text limits allow, chunked or not."""
    from clair.edge.web import text_max_body

    cap = text_max_body(lan_web.cfg)
    assert 1_000_000 < cap < 2_000_000  # the defaults: a 48 000-character history fits, 8 MB does not

    async def chunks(n: int):
        for _ in range(n // 65536 + 1):
            yield b" " * 65536

    async def go():
        async with _as(lan_web, "alice") as alice:
            over = await alice.post("/gradio_api/queue/join", content=chunks(cap), headers={"content-type": "application/json"})
            history = [{"role": "user", "content": "é" * 1000}] * 48
            fits = await alice.post("/gradio_api/queue/join", json={"data": ["hi", history], "fn_index": 0, "session_hash": "h1"})
            return over, fits

    over, fits = _run(go())
    assert over.status_code == 413 and "MB" in over.json()["detail"]
    assert fits.status_code == 200


def test_a_body_must_keep_moving():
    """A slowloris body (one part, then nothing) is refused with 408, not held open."""

    async def go():
        parts = [{"type": "http.request", "body": b"{", "more_body": True}]
        never = asyncio.Event()

        async def receive():
            if parts:
                return parts.pop()
            await never.wait()

        with pytest.raises(edge.BodyRefused) as refused:
            await edge.read_body(receive, 1 << 20, idle_s=0.05)
        return refused.value.status

    assert _run(go()) == 408


# --- the body budget and the per-person count, as a state machine ------------------------------------


class BodiesMachine(RuleBasedStateMachine):
    """Claims of two claimants that grow, close (twice, as the guard's paths may), and people that enter and
    leave, in any order. After every step: the budget holds exactly what the open claims hold past their free
    part, never more than its total nor more than its share for one claimant; a refused growth changes nothing
    but the refusal count and says which limit refused it; each person's count is what the model says, never
    over the cap, and a second `leave` takes nothing."""

    TOTAL, SHARE, CAP = 10 * 2**20, 6 * 2**20, 2
    WHO = ("ann", "ann", "bob", "bob")  # the claimant of each claim

    def __init__(self):
        super().__init__()
        self.budget = edge.BodyBudget(self.TOTAL, share=self.SHARE)
        self.claims = [self.budget.claim(w) for w in self.WHO]
        self.counted = [0, 0, 0, 0]  # the model: bytes each claim holds
        self.people = edge.PerPerson(self.CAP)
        self.leaves: dict[str, list] = {"ann": [], "bob": []}
        self.refused = 0

    def mine(self, who: str, but: int = -1) -> int:
        return sum(c for i, c in enumerate(self.counted) if self.WHO[i] == who and i != but)

    # Quarter-MB steps, sometimes one byte more: sums land on the limits' edges and one byte past them.
    sizes = st.tuples(st.integers(0, 56), st.integers(0, 1)).map(lambda t: t[0] * 2**18 + t[1])

    @rule(i=st.integers(0, 3), size=sizes)
    def grow(self, i, size):
        want = max(self.counted[i], size - edge.BODY_FREE)
        share_ok = self.mine(self.WHO[i], but=i) + want <= self.SHARE
        total_ok = sum(self.counted) - self.counted[i] + want <= self.TOTAL
        assert self.claims[i].grow(size) == (share_ok and total_ok)
        if share_ok and total_ok:
            self.counted[i] = want
        elif want > self.counted[i]:
            self.refused += 1
            assert self.claims[i].why == ("share" if not share_ok else "total")
            assert self.claims[i].refusal().status == 503

    @rule(i=st.integers(0, 3), size=sizes)
    def fits(self, i, size):
        """A Content-Length checked before the body: it fits beside what is held (that claim's own bytes
        included, since a new request's claim is empty), and checking it holds nothing."""
        n = max(0, size - edge.BODY_FREE)
        share_ok = self.mine(self.WHO[i]) + n <= self.SHARE
        total_ok = sum(self.counted) + n <= self.TOTAL
        assert self.budget.fits(self.WHO[i], size) == (None if share_ok and total_ok else ("share" if not share_ok else "total"))

    @rule(i=st.integers(0, 3))
    def close(self, i):
        self.claims[i].close()
        self.counted[i] = 0

    @rule(who=st.sampled_from(["ann", "bob"]))
    def enter(self, who):
        leave = self.people.enter(who)
        assert (leave is not None) == (len(self.leaves[who]) < self.CAP)
        if leave is not None:
            self.leaves[who].append(leave)

    @rule(who=st.sampled_from(["ann", "bob"]), twice=st.booleans())
    def leave(self, who, twice):
        if self.leaves[who]:
            leave = self.leaves[who].pop(0)
            leave()
            if twice:
                leave()  # as the guard's sender and its `finally` both may

    @invariant()
    def books_balance(self):
        assert self.budget.held == sum(self.counted) <= self.TOTAL
        assert self.budget.per == {w: self.mine(w) for w in ("ann", "bob") if self.mine(w)}
        assert all(v <= self.SHARE for v in self.budget.per.values())
        assert self.budget.peak >= self.budget.held and self.budget.refused == self.refused
        assert self.people.count == {w: len(ls) for w, ls in self.leaves.items() if ls}


BodiesMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, derandomize=True, database=None
)
TestBodiesInvariants = BodiesMachine.TestCase
