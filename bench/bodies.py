"""Many large bodies at once from one client at the Ollama-compatible port: what they cost the server.

    python bench/bodies.py                 # this checkout; about 15 s
    python bench/bodies.py /path/to/clair  # another checkout, e.g. one from before the body budget

Starts the Ollama stand-in (tests/ollama_standin.py) and Clair (`python app.py`, the Ollama-compatible port
on, no users: from loopback no key is needed, so every request is one person's, counted by address), then
sends 16 chats of 64 MB each at once to /api/chat (the port's body cap), each with its Content-Length, as a
client with one key would. Printed: the status each got, the server's memory (RSS) before and at its peak,
and the latency of /healthz on the web port, asked every 0.1 s meanwhile.

What to expect since the guard counts a person's GPU requests before reading their bodies
(clair.edge.guard.PerPerson: 429 past CLAIR_MAX_JOBS_PER_USER) and holds all bodies within one budget, half of
it at most for one person (BodyBudget: 503 past it): two bodies are read (and answered 400 here: their text is
far over Clair's limits), the other fourteen are refused before their body is read.

Then slow senders: two other people (127.0.0.2 and 127.0.0.3: on loopback each address is its own person) each
declare two 64 MB chats, send 3 MB of each and then one byte every 2 s; a third (127.0.0.4) sends a 20 MB image
chat, again every second while it is refused 503. Printed: how long the image chat waited, how many times it
was refused, and what the slow senders got and when (at most SLOW_S seconds are watched). While the budget
was claimed from each Content-Length, the four slow bodies held 248 of its 256 MB until the 120 s read limit;
counted as their bytes arrive, and cut when they crawl (clair.edge.guard.Pace), they hold 4 MB for 5 s.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BODIES, SIZE = 16, 64 * 2**20 - 1024
SLOW_S = 60.0  # how long the slow senders' scenario is watched at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkout: Path, tmp: str) -> tuple[subprocess.Popen, subprocess.Popen, int, int]:
    ollama, web, gateway = free_port(), free_port(), free_port()
    standin = subprocess.Popen(
        [sys.executable, "-m", "tests.ollama_standin", "--port", str(ollama), "--load-delay", "0", "--unload-delay", "0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAIR_")}
    env |= {
        "OLLAMA_HOST": f"127.0.0.1:{ollama}", "CLAIR_PORT": str(web), "CLAIR_OLLAMA_PORT": str(gateway),
        "CLAIR_CHAT_BACKEND": "ollama", "CLAIR_OUTPUT_DIR": tmp + "/outputs", "CLAIR_PRELOAD": "0",
        "CLAIR_WARMUP": "0", "CLAIR_IMAGE_MODEL": "tiny", "HF_HUB_OFFLINE": "1",
    }
    clair = subprocess.Popen(
        [sys.executable, "app.py"], cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{web}/healthz", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    return standin, clair, web, gateway


def post(port: int, body: bytes, codes: list[str]) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
    with contextlib.suppress(OSError):
        s.sendall(body)  # a refusal closes the connection before all of it is sent
    try:
        codes.append(s.recv(64).split(b" ")[1].decode())
    except (OSError, IndexError) as exc:
        codes.append(type(exc).__name__)
    s.close()


def crawl(port: int, source: str, out: list, t0: float) -> None:
    """Declare a 64 MB chat, send 3 MB of it, then a byte every 2 s until answered (or SLOW_S is up)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=120, source_address=(source, 0))
    head = f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    s.sendall(f"{head}Content-Length: {64 * 2**20}\r\n\r\n".encode() + b'{"model": "' + b"x" * (3 * 2**20))
    s.settimeout(2)
    answer = b""
    while time.monotonic() - t0 < SLOW_S and not answer:
        try:
            answer = s.recv(64)
        except TimeoutError:
            with contextlib.suppress(OSError):
                s.sendall(b"x")
        except OSError:
            break
    out.append((answer.split(b" ")[1].decode() if answer.count(b" ") else "none", time.monotonic() - t0))
    s.close()


def image_chat(port: int, source: str) -> str:
    image = b"A" * (20 * 2**20)  # base64 of an image, as a vision client sends it
    body = b'{"model": "llama3.1:8b", "stream": false, "messages": [{"role": "user", "content": "what is this?", "images": ["' + image + b'"]}]}'
    s = socket.create_connection(("127.0.0.1", port), timeout=120, source_address=(source, 0))
    head = f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    try:
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        with contextlib.suppress(OSError):
            s.sendall(body)
        return s.recv(64).split(b" ")[1].decode()
    except (OSError, IndexError) as exc:
        return type(exc).__name__
    finally:
        s.close()


def slow_senders(gateway: int) -> list[str]:
    t0, crawled = time.monotonic(), []
    crawlers = [threading.Thread(target=crawl, args=(gateway, a, crawled, t0)) for a in ["127.0.0.2"] * 2 + ["127.0.0.3"] * 2]
    for t in crawlers:
        t.start()
    time.sleep(1.0)  # their first 3 MB are in
    asked, refusals, status = time.monotonic(), 0, ""
    while time.monotonic() - t0 < SLOW_S:
        status = image_chat(gateway, "127.0.0.4")
        if status != "503":
            break
        refusals += 1
        time.sleep(1.0)
    waited = time.monotonic() - asked
    for t in crawlers:
        t.join()
    return [
        f"slow senders (4 x 64 MB declared, 3 MB sent, then a byte every 2 s; watched {SLOW_S:.0f} s at most):",
        f"  a 20 MB image chat from another person: {status or '-'} after {waited:.1f} s, refused 503 {refusals} times",
        f"  the slow senders got: {', '.join(f'{c} at {t:.1f} s' for c, t in sorted(crawled, key=lambda x: x[1]))}",
    ]


def main() -> None:
    checkout = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    with tempfile.TemporaryDirectory() as tmp:
        standin, clair, web, gateway = start(checkout, tmp)
        try:
            proc = psutil.Process(clair.pid)
            base = proc.memory_info().rss
            text = b"a" * (SIZE - 80)
            body = b'{"model": "llama3.1:8b", "messages": [{"role": "user", "content": "' + text + b'"}]}'
            codes: list[str] = []
            rss, latency, done = [base], [], threading.Event()

            def watch() -> None:
                while not done.is_set():
                    rss.append(proc.memory_info().rss)
                    t = time.monotonic()
                    with contextlib.suppress(OSError):
                        urllib.request.urlopen(f"http://127.0.0.1:{web}/healthz", timeout=60)
                    latency.append(time.monotonic() - t)
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch)
            watcher.start()
            t0 = time.monotonic()
            senders = [threading.Thread(target=post, args=(gateway, body, codes)) for _ in range(BODIES)]
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            took = time.monotonic() - t0
            done.set()
            watcher.join()
            slow = slow_senders(gateway)
        finally:
            clair.terminate()
            standin.terminate()
            clair.wait(20)
            standin.wait(20)
    print(f"checkout: {checkout}")
    print(f"{BODIES} x {SIZE / 2**20:.0f} MB bodies at once, all answered in {took:.1f} s")
    print(f"statuses: {', '.join(f'{c} x{codes.count(c)}' for c in sorted(set(codes)))}")
    print(f"server RSS: {base / 2**20:.0f} MiB before, {max(rss) / 2**20:.0f} MiB at its peak")
    print(f"/healthz meanwhile: median {sorted(latency)[len(latency) // 2]:.3f} s, max {max(latency):.2f} s ({len(latency)} asked)")
    print("\n".join(slow))


if __name__ == "__main__":
    main()
