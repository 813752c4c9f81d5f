"""What the image worker process costs (CLAIR_WORKERS=on): start-up, and the protocol per step and per token.

    python bench/worker.py                  # CPU, no GPU or network, ~1 minute
    python bench/worker.py --pings 5000 --steps 40 --tokens 20000

Figures, each from the real worker (clair/engines/worker.py, clair/engines/worker_main.py) unless said:

* start-up: from spawning the worker (a fresh interpreter) to its first answer (it has imported torch and
  diffusers), then its first load (the tiny pipeline, built in code);
* the round trip on the job pipe (`ping`): a render's step costs two of them (the step, then the checkpoint
  between steps: the arbiter's pause decision runs in the web process);
* per step, end to end: the same render (tiny pipeline, 64x64) in this process and in the worker, per step,
  and the difference (noisy on a shared machine: a few tenths of a millisecond either way are noise);
* per token: a one-way stream of token-sized messages through the same transport (a
  `multiprocessing.connection` pipe to a spawned process). The in-process chat model does not run in a worker
  yet, so this is the transport a `token` message would take, not a chat.

Figures are in docs/performance.md, "The worker process".
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clair.base.config import Config
from clair.engines.image import ImageEngine, RenderParams
from clair.engines.worker import WorkerImageEngine


def _tokens(conn, n: int) -> None:
    """The child's side of the token stream: n token messages, then the end."""
    for _ in range(n):
        conn.send(("cb", "token", 1, "tok"))
    conn.send(("done", n))
    conn.recv()


def per_token_us(n: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_tokens, args=(child, n))
    proc.start()
    first = parent.recv()  # the first token: the child is up
    assert first[1] == "token"
    t0 = time.perf_counter()
    count = 1
    while parent.recv()[0] != "done":
        count += 1
    dt = time.perf_counter() - t0
    parent.send("bye")
    proc.join(10)
    return dt / max(1, count - 1) * 1e6


def render_per_step_ms(engine, steps: int, repeats: int) -> float:
    params = RenderParams("a lighthouse at dusk", steps=steps, width=64, height=64, seed=1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.render(params, on_step=lambda n, t: None, checkpoint=lambda n, t: None)
        best = min(best, time.perf_counter() - t0)
    return best / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=10000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clair-bench-worker-"))
    cfg = dataclasses.replace(Config(), image_model="tiny", output_dir=str(tmp), workers="on")

    t0 = time.perf_counter()
    worker = WorkerImageEngine(cfg)
    started = worker.startup_s()
    t1 = time.perf_counter()
    worker.load()
    load_s = time.perf_counter() - t1
    print(f"worker start-up (spawn to first answer): {started:.2f} s; first load (tiny pipeline): {load_s:.2f} s; "
          f"in all {time.perf_counter() - t0:.2f} s")

    for _ in range(200):
        worker.ping()  # warm
    rtt = []
    for _ in range(args.pings):
        a = time.perf_counter()
        worker.ping()
        rtt.append(time.perf_counter() - a)
    rtt.sort()
    p50, p99 = rtt[len(rtt) // 2] * 1e6, rtt[int(len(rtt) * 0.99)] * 1e6
    print(f"job pipe round trip: p50 {p50:.0f} us, p99 {p99:.0f} us, mean {statistics.fmean(rtt) * 1e6:.0f} us "
          f"({args.pings} pings); a step costs two: about {2 * p50:.0f} us")

    inproc = ImageEngine(cfg)
    inproc.load()
    here = render_per_step_ms(inproc, args.steps, args.repeats)
    there = render_per_step_ms(worker, args.steps, args.repeats)
    print(f"render per step (tiny, 64x64, {args.steps} steps, best of {args.repeats}): in this process {here:.2f} ms, "
          f"in the worker {there:.2f} ms, difference {there - here:+.2f} ms")

    tok = per_token_us(args.tokens)
    print(f"per token (one-way stream over the same transport, {args.tokens} messages): {tok:.1f} us")
    worker.close()


if __name__ == "__main__":
    main()
