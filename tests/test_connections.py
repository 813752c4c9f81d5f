"""Connection limits below the HTTP layer (clair.edge.web.guarded_protocol, clair.edge.web.server_limits): a slowloris
from other machines cannot make Clair answer 503 to everyone, nor to the watchdog's /healthz on loopback.

The "machines" are real other addresses: each scenario runs in a network namespace of its own
(`unshare -n`, which needs root; skipped otherwise), whose loopback device carries 10.99.0.1-6 besides
127.0.0.1. A connection from 10.99.0.3 to 10.99.0.1 is, to Clair, a LAN client at 10.99.0.3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.support import ROOT

SETUP = "ip link set lo up && for i in 1 2 3 4 5 6; do ip addr add 10.99.0.$i/32 dev lo; done"

COMMON = """
import json, socket, threading, time
import uvicorn
from types import SimpleNamespace
from clair.edge.web import server_limits

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"path": scope["path"], "client": scope["client"][0]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

def serve(max_connections, header_timeout_s=None, proxies=""):
    limits = server_limits(SimpleNamespace(max_connections=max_connections, trusted_proxies=proxies))
    if header_timeout_s is not None:
        from clair.edge.web import guarded_protocol
        limits["http"] = guarded_protocol(max_connections, header_timeout_s, trusted=[p for p in proxies.split(",") if p])
    server = uvicorn.Server(uvicorn.Config(app, host="0.0.0.0", port=8000, log_level="error", **limits))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server

def connect(source, dest="10.99.0.1"):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(3)
    s.connect((dest, 8000))
    return s

def get(source, path="/", dest="10.99.0.1", headers=""):
    try:
        with connect(source, dest) as s:
            s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\n{headers}Connection: close\\r\\n\\r\\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data.decode("latin-1")
    except OSError as exc:
        return f"closed: {exc}"

def closed_by_server(s, within):
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True

def half_open(source, n):
    held = []
    for _ in range(n):
        try:
            s = connect(source)
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: x")  # and never the rest
            held.append(s)
        except OSError:
            break
    return held
"""


def in_namespace(script: str) -> dict:
    """Run `script` (after COMMON) in a fresh network namespace; it prints one JSON line: its findings."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("a network namespace needs root, unshare and ip")
    code = COMMON + textwrap.dedent(script)
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", f'{SETUP} && exec "$0" -c "$1"', sys.executable, code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip("network namespaces are not permitted here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_five_machines_holding_half_open_connections_leave_healthz_to_loopback():
    """Five addresses with 64 half-open connections each (the default 256 in all) fill the house: other
    machines are turned away, but loopback's /healthz is answered (no 503 for the watchdog)."""
    found = in_namespace(
        """
        serve(256, header_timeout_s=60)
        held = {f"10.99.0.{i}": half_open(f"10.99.0.{i}", 64) for i in range(2, 7)}
        time.sleep(0.3)
        alive = sum(1 for socks in held.values() for s in socks if not closed_by_server(s, 0.01))
        health = [get("127.0.0.1", "/healthz", dest="127.0.0.1") for _ in range(3)]
        print(json.dumps({"alive": alive, "health": [h.split("\\r\\n", 1)[0] for h in health]}))
        """
    )
    assert found["alive"] <= 256
    assert found["health"] == ["HTTP/1.1 200 OK"] * 3, found


def test_one_machine_cannot_hold_every_connection_and_slow_headers_are_cut():
    found = in_namespace(
        """
        serve(32, header_timeout_s=1.0)  # a quarter per machine: 8
        held = half_open("10.99.0.2", 8)
        time.sleep(0.2)
        ninth = connect("10.99.0.2")
        out = {"ninth_closed": closed_by_server(ninth, 2.0)}
        out["other_machine"] = get("10.99.0.3").split("\\r\\n", 1)[0]
        out["half_open_cut"] = all(closed_by_server(s, 3.0) for s in held)
        for s in (*held, ninth):
            s.close()
        s = connect("10.99.0.4")  # a kept-alive connection that then dribbles a second request
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        answer = b""
        while not answer.endswith(b"}"):
            answer += s.recv(4096)
        s.sendall(b"GET / HTTP/1.1\\r\\nHo")
        out["dribble_cut"] = closed_by_server(s, 3.0)
        s.close()
        out["first_again"] = get("10.99.0.2").split("\\r\\n", 1)[0]
        print(json.dumps(out))
        """
    )
    assert found == {
        "ninth_closed": True,
        "other_machine": "HTTP/1.1 200 OK",
        "half_open_cut": True,
        "dribble_cut": True,
        "first_again": "HTTP/1.1 200 OK",
    }


def test_ipv6_addresses_of_one_64_and_loopback_addresses_count_as_one_machine():
    from clair.edge.web import machine

    assert machine("2001:db8:1:2::1") == machine("2001:db8:1:2::ffff") != machine("2001:db8:1:3::1")
    assert machine("127.0.0.1") == machine("127.0.0.2") == machine("::1") == "loopback"
    assert machine("192.168.1.9") != machine("192.168.1.10")


def test_x_forwarded_for_is_believed_from_trusted_proxies_only():
    """Without CLAIR_TRUSTED_PROXIES a client cannot name its own address; a listed proxy can name its clients."""
    found = in_namespace(
        """
        serve(64)
        plain = json.loads(get("10.99.0.2", headers="X-Forwarded-For: 192.168.77.5\\r\\n").split("\\r\\n\\r\\n", 1)[1])
        local = json.loads(get("127.0.0.1", dest="127.0.0.1", headers="X-Forwarded-For: 192.168.77.6\\r\\n").split("\\r\\n\\r\\n", 1)[1])
        print(json.dumps({"lan": plain["client"], "local": local["client"]}))
        """
    )
    assert found == {"lan": "10.99.0.2", "local": "127.0.0.1"}
    found = in_namespace(
        """
        serve(64, proxies="10.99.0.2")
        proxied = json.loads(get("10.99.0.2", headers="X-Forwarded-For: 192.168.77.5\\r\\n").split("\\r\\n\\r\\n", 1)[1])
        other = json.loads(get("10.99.0.3", headers="X-Forwarded-For: 192.168.77.7\\r\\n").split("\\r\\n\\r\\n", 1)[1])
        print(json.dumps({"proxied": proxied["client"], "other": other["client"]}))
        """
    )
    assert found == {"proxied": "192.168.77.5", "other": "10.99.0.3"}


def test_loopback_clients_holding_their_quarter_leave_healthz_to_the_watchdog():
    """A local client (another address on loopback: to Clair, this machine) holding a quarter of the connections
    must not keep the watchdog's /healthz out: systemd restarts Clair when it fails for WatchdogSec. (Found by
    the outside attack: a reverse proxy Clair was not told to trust carries every LAN client as loopback.) The
    watchdog asks from its own address (WATCHDOG_SOURCE), past the per-machine cap; others stay capped."""
    found = in_namespace(
        """
        from clair.main import healthz
        serve(256, header_timeout_s=60)
        held = half_open("127.0.0.2", 64)
        time.sleep(0.3)
        other = get("127.0.0.1", "/healthz", dest="127.0.0.1")
        health = [healthz("http://127.0.0.1:8000", timeout=3) for _ in range(3)]
        print(json.dumps({
            "held": len(held), "other": other.split("\\r\\n", 1)[0],
            "health": [(status, json.loads(body)["client"] if body else None) for status, body in health],
        }))
        """
    )
    assert found["held"] == 64
    assert not found["other"].startswith("HTTP/1.1 200"), found  # the cap still holds for everyone else
    assert found["health"] == [[200, "127.0.0.254"]] * 3, found
