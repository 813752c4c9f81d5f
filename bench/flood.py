"""One client floods Clair with GPU jobs; how long does another client's chat take?

    python bench/flood.py --jobs 100        # CPU, no GPU or network, ~1 minute

Starts `python app.py` against the Ollama stand-in (tests/), as the tests do. While a render holds the
GPU, a greedy client (127.0.0.1) sends `--jobs` requests at once, half `/chat` and half `/render`
(256x256, 4 steps), through Gradio's real queue protocol; a second client (127.0.0.2) then sends one
chat. Printed: how the greedy requests were answered (run, refused by the cap, "queue full" from Gradio),
and the other client's chat latency against the same chat without the flood. The caps are Clair's
defaults unless given.

Measured on the 2-core CPU VM (shared, load ~5), --jobs 100: with the caps, 3 of the greedy requests ran
and 97 were refused, and the other client's chat took 3.67 s (3.74 s without the flood: it waits for the
render that holds the GPU). Without the caps (the parent commit), all 100 ran and the chat took 7.69 s
(3.77 s without the flood).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.ollama_standin import OllamaStandin
from tests.support import App, Raw, wait_until

MODEL = "llama3.1:8b"


def outcome(r: dict) -> str:
    if r["ok"]:
        return "ran"
    text = str(r["error"])
    if "Busy" in text:
        return f"refused by the cap (HTTP {r['status']})"
    if r["status"] == 503 or "Queue is full" in text:
        return "Gradio queue full (HTTP 503)"
    return f"other error (HTTP {r['status']}): {text[:80]}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--per-user", type=int, default=None)
    ap.add_argument("--max-queue", type=int, default=None)
    args = ap.parse_args()
    env = {"CLAIR_CHAT_BACKEND": "ollama", "CLAIR_PRELOAD": "0", "CLAIR_WARMUP": "0"}
    if args.per_user:
        env["CLAIR_MAX_JOBS_PER_USER"] = str(args.per_user)
    if args.max_queue:
        env["CLAIR_MAX_QUEUE"] = str(args.max_queue)
    with OllamaStandin({MODEL: 4.9}, load_delay=0.5, unload_delay=0.3, token_delay=0.02) as standin:
        env["OLLAMA_HOST"] = standin.host
        with tempfile.TemporaryDirectory() as tmp:
            app = App(Path(tmp), env)
            try:
                greedy, other = Raw(app.url, "127.0.0.1"), Raw(app.url, "127.0.0.2")
                app.render()  # load the tiny pipeline
                t0 = time.monotonic()
                assert other.call("chat", ["baseline", []])["ok"]
                baseline = time.monotonic() - t0

                slow = ["a slow one", "", 20, 5.0, 1024, 1024, 1]
                pool = ThreadPoolExecutor(args.jobs + 4)

                def behind_a_render() -> float:
                    """How long the other client's chat takes when it arrives 0.2 s into a render."""
                    holder = pool.submit(greedy.call, "render", slow)
                    wait_until(lambda: (app.status()["holder"] or {}).get("kind") == "render", timeout=60)
                    time.sleep(0.2)
                    t0 = time.monotonic()
                    assert other.call("chat", ["no flood", []])["ok"]
                    took = time.monotonic() - t0
                    holder.result(timeout=600)
                    return took

                quiet = behind_a_render()
                holder = pool.submit(greedy.call, "render", slow)
                wait_until(lambda: (app.status()["holder"] or {}).get("kind") == "render", timeout=60)
                start = threading.Barrier(args.jobs + 1)

                def one(i: int) -> dict:
                    start.wait()
                    if i % 2:
                        return greedy.call("chat", [f"flood {i}", []])
                    return greedy.call("render", ["flood", "", 4, 5.0, 256, 256, i])

                flood = [pool.submit(one, i) for i in range(args.jobs)]
                start.wait()
                time.sleep(0.2)  # the flood is in
                t0 = time.monotonic()
                mine = other.call("chat", ["are you there?", []])
                latency = time.monotonic() - t0
                results = [f.result(timeout=600) for f in flood]
                holder.result(timeout=600)
                pool.shutdown()
            finally:
                app.stop()
    counts = Counter(outcome(r) for r in results)
    print(f"greedy client: {args.jobs} requests at once (half /chat, half /render) while a render held the GPU")
    for what, n in counts.most_common():
        print(f"  {n:4d}  {what}")
    print(f"other client's chat, sent 0.2 s into a render, during the flood: {'ok' if mine['ok'] else outcome(mine)} "
          f"in {latency:.2f} s")
    print(f"  the same without the flood: {quiet:.2f} s; with the GPU free: {baseline:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
