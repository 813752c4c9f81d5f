"""The issue-15 reproductions, as a LAN attacker makes them, against the real app: prints what each got.

    sudo python bench/edge.py        # about a minute; needs root for a network namespace of its own

Re-runs itself in a fresh network namespace (`unshare -n`) whose loopback device carries 10.99.0.1-7:
Clair (`python app.py --demo --listen`, one user with a key, the Ollama-compatible port on) serves them,
and the attacker connects from 10.99.0.2-6, other machines as far as Clair can tell. Printed:

* the server's memory (RSS) before and after a 500 MB chunked body to /v1 on the web port (with a key)
  and to /v1 and /api/chat on the Ollama port (from loopback, no key), and the status each got;
* /healthz latency for another client while 8 MB JSON bodies go to /v1, against without them;
* the status for deeply nested JSON and for bad JSON on each port;
* /healthz from loopback while five machines hold 64 half-open connections each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER = "10.99.0.1"
PASSWORD = "a long household password"


def reexec_in_namespace() -> None:
    if os.environ.get("BENCH_EDGE_NS") == "1":
        return
    if os.geteuid() != 0 or not shutil.which("unshare"):
        sys.exit("bench/edge.py needs root (a network namespace of its own): run it with sudo")
    setup = "ip link set lo up && for i in 1 2 3 4 5 6 7; do ip addr add 10.99.0.$i/32 dev lo; done"
    os.environ["BENCH_EDGE_NS"] = "1"
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", f'{setup} && exec "$0" "$@"', sys.executable, *sys.argv])


def connect(source: str, port: int, dest: str = SERVER) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect((dest, port))
    return s


def status_of(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode("latin-1") or "(closed)"


def chunked(source: str, port: int, path: str, mib: int, headers: str = "", dest: str = SERVER) -> str:
    s = connect(source, port, dest)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {dest}:{port}\r\nContent-Type: application/json\r\n{headers}"
              "Transfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
    block = b"[" + b"1," * (512 * 1024 - 1) + b"1"
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    s.settimeout(3)
    try:
        for _ in range(mib):
            s.sendall(chunk)
    except OSError:
        pass
    s.settimeout(30)
    answer = b""
    try:
        while b"\r\n" not in answer:
            part = s.recv(4096)
            if not part:
                break
            answer += part
    except OSError:
        pass
    s.close()
    return status_of(answer)


def post(source: str, port: int, path: str, body: bytes, headers: str = "") -> str:
    s = connect(source, port)
    with contextlib.suppress(OSError):  # refused before the whole body was read: the answer is waiting
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {SERVER}:{port}\r\nContent-Type: application/json\r\n{headers}"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)  # fmt: skip
    answer = b""
    try:
        while part := s.recv(65536):
            answer += part
    except OSError:
        pass
    s.close()
    return status_of(answer)


def healthz_ms(source: str, port: int, dest: str = SERVER) -> float:
    t0 = time.perf_counter()
    s = connect(source, port, dest)
    s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {dest}:{port}\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while part := s.recv(4096):
        answer += part
    s.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    reexec_in_namespace()
    import psutil

    from tests.support import free_port

    tmp = Path(tempfile.mkdtemp(prefix="clair-edge-"))
    users = tmp / "users.json"
    subprocess.run([sys.executable, str(ROOT / "app.py"), "adduser", "alice", "--users-file", str(users)],
                   input=PASSWORD + "\n", text=True, check=True, capture_output=True)  # fmt: skip
    made = subprocess.run([sys.executable, str(ROOT / "app.py"), "addkey", "alice", "--users-file", str(users)],
                          text=True, check=True, capture_output=True).stdout  # fmt: skip
    key = next(line for line in made.splitlines() if line.startswith("clair-"))
    port, oport = free_port(), free_port()
    env = {**os.environ, "CLAIR_USERS_FILE": str(users), "CLAIR_PORT": str(port), "CLAIR_OLLAMA_PORT": str(oport),
           "CLAIR_OUTPUT_DIR": str(tmp / "outputs"), "CLAIR_PRELOAD": "0", "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    log = (tmp / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--demo", "--listen"], env=env, cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                healthz_ms("127.0.0.1", port, "127.0.0.1")
                connect("127.0.0.1", oport, "127.0.0.1").close()
                break
            except (OSError, AssertionError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit("the app did not start:\n" + (tmp / "app.log").read_text()[-2000:])
                time.sleep(0.3)
        me = psutil.Process(proc.pid)
        rss = lambda: me.memory_info().rss / 2**20  # noqa: E731
        auth = f"Authorization: Bearer {key}\r\n"
        print("## 500 MB chunked bodies (server RSS in MiB)")
        for label, args in (
            ("web port /v1 (LAN, key)", ("10.99.0.2", port, "/v1/chat/completions", 500, auth)),
            ("Ollama port /v1 (loopback, no key)", ("127.0.0.1", oport, "/v1/chat/completions", 500, "", "127.0.0.1")),
            ("Ollama port /api/chat (loopback, no key)", ("127.0.0.1", oport, "/api/chat", 500, "", "127.0.0.1")),
            ("Ollama port /v1 (LAN, key)", ("10.99.0.2", oport, "/v1/chat/completions", 500, auth)),
        ):
            before = rss()
            got = chunked(*args)
            print(f"{label}: {got}; RSS {before:.0f} -> {rss():.0f}")

        print("## /healthz for another machine while 8 MB JSON bodies go to /v1 (ms)")
        quiet = [healthz_ms("10.99.0.3", port) for _ in range(20)]
        big = json.dumps({"model": "x", "messages": [{"role": "user", "content": "y" * (8 * 2**20 - 200)}]}).encode()
        stop = threading.Event()
        statuses: list[str] = []

        def flood() -> None:
            while not stop.is_set():
                statuses.append(post("10.99.0.4", port, "/v1/chat/completions", big, auth))

        threads = [threading.Thread(target=flood) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1)
        busy = [healthz_ms("10.99.0.3", port) for _ in range(20)]
        stop.set()
        for t in threads:
            t.join()
        print(f"quiet: median {statistics.median(quiet):.1f}, max {max(quiet):.1f}")
        print(f"during: median {statistics.median(busy):.1f}, max {max(busy):.1f} ({len(statuses)} bodies: {sorted(set(statuses))})")

        print("## /healthz for another machine while 8 MB bodies go to Gradio's queue/join, logged in (ms)")
        s = connect("10.99.0.4", port)
        form = f"username=alice&password={PASSWORD.replace(' ', '+')}".encode()
        s.sendall(f"POST /login HTTP/1.1\r\nHost: {SERVER}:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                  f"Content-Length: {len(form)}\r\nConnection: close\r\n\r\n".encode() + form)  # fmt: skip
        head = b""
        while part := s.recv(65536):
            head += part
        s.close()
        cookies = "; ".join(
            line.split(":", 1)[1].split(";", 1)[0].strip()
            for line in head.decode("latin-1").split("\r\n")
            if line.lower().startswith("set-cookie:")
        )
        for size in (8 * 2**20, 1_300_000):  # 8 MB, and just under the cap of Gradio's routes (1.3 MB by default)
            join = json.dumps({"data": ["y" * (size - 200), []], "fn_index": 0, "session_hash": f"bench{size}"}).encode()
            stop.clear()
            statuses.clear()

            def gradio_flood(join=join) -> None:
                while not stop.is_set():
                    statuses.append(post("10.99.0.4", port, "/gradio_api/queue/join", join, f"Cookie: {cookies}\r\n"))

            threads = [threading.Thread(target=gradio_flood) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(1)
            busy = [healthz_ms("10.99.0.3", port) for _ in range(20)]
            stop.set()
            for t in threads:
                t.join()
            print(f"{size / 1e6:.1f} MB bodies: median {statistics.median(busy):.1f}, max {max(busy):.1f} "
                  f"({len(statuses)} bodies: {sorted(set(statuses))})")  # fmt: skip

        print("## bad JSON")
        deep = b'{"model": "m", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        for label, where in (("web /v1", (port, "/v1/chat/completions", auth)), ("Ollama /api/chat", (oport, "/api/chat", auth)),
                             ("Ollama /v1", (oport, "/v1/chat/completions", auth))):  # fmt: skip
            p, path, h = where
            print(f"{label}: deep {post('10.99.0.5', p, path, deep, h)}, bad {post('10.99.0.5', p, path, b'{[}', h)}")

        print("## five machines x 64 half-open connections; /healthz from loopback")
        held = []
        for i in range(2, 7):
            for _ in range(64):
                try:
                    s = connect(f"10.99.0.{i}", port)
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x")
                    held.append(s)
                except OSError:
                    break
        time.sleep(0.5)
        loop = [healthz_ms("127.0.0.1", port, "127.0.0.1") for _ in range(5)]
        try:
            other = f"{healthz_ms('10.99.0.7', port):.0f} ms"
        except (OSError, AssertionError) as exc:
            other = f"refused ({exc.__class__.__name__})"
        print(f"held {len(held)} connections; loopback /healthz: 5 of 5 answered 200, max {max(loop):.0f} ms; a sixth machine: {other}")
        for s in held:
            s.close()
        text = (tmp / "app.log").read_text()
        print(f"## log: {text.count('Traceback')} tracebacks, {text.count(' 500 ')} lines with ' 500 '")
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    main()
