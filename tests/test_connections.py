"""Connection limits below the HTTP layer (clair.web.guarded_protocol): a slowloris from one machine cannot
make Clair answer 503 to everyone. A real uvicorn server on loopback; "machines" are 127.0.0.x sources."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from clair.web import guarded_protocol
from tests.support import free_port, wait_until


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server():
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        limit_concurrency=32,  # a quarter per address: 8
        http=guarded_protocol(32, header_timeout_s=1.0),
    )
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    wait_until(lambda: srv.started, timeout=10)
    yield port
    srv.should_exit = True
    t.join(10)


def connect(port: int, source: str) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(3)
    s.connect(("127.0.0.1", port))
    return s


def get(port: int, source: str) -> bytes:
    with connect(port, source) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_one_machine_cannot_hold_every_connection_and_slow_headers_are_cut(server):
    port = server
    half_open = []
    for _ in range(8):
        s = connect(port, "127.0.0.20")
        s.sendall(b"GET / HTTP/1.1\r\nHost: local")  # and never the rest
        half_open.append(s)
    time.sleep(0.2)
    ninth = connect(port, "127.0.0.20")
    assert closed_by_server(ninth, 2.0), "a ninth connection from the same machine was kept"
    # Another machine is served meanwhile.
    assert get(port, "127.0.0.21").startswith(b"HTTP/1.1 200")
    # The half-open ones are closed once their headers are late.
    assert all(closed_by_server(s, 3.0) for s in half_open)
    for s in (*half_open, ninth):
        s.close()
    # A kept-alive connection that then dribbles a second request is cut too.
    with connect(port, "127.0.0.22") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):  # the whole response (headers and body may come apart)
            chunk = s.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET / HTTP/1.1\r\nHo")
        assert closed_by_server(s, 3.0)
    # Its slots were given back: the first machine is served again.
    assert get(port, "127.0.0.20").startswith(b"HTTP/1.1 200")
