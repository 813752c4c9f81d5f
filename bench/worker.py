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
* per token: the in-process chat model (the tiny one) streaming in this process and in its worker, where each
  piece of text is one round trip (`("cb", "token", text)`, answered with whether to stop); and, for scale,
  a one-way stream of token-sized messages through the same transport;
* `--cards`: the mixed load (three chat users and an image user at once: the Ollama stand-in's 8B model,
  4.9 GB, and 512x512 renders, 8.1 GiB, which do not fit together in a 12 GB card's 10.5 GiB budget) on one
  simulated 12 GB card, then on two (12 and 24 GB, Ollama on card 0): evictions (Ollama's unloads and the
  arbiters' swaps) and chat time to first token.

Figures are in docs/performance.md, "The worker process".
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clair.base.config import Config
from clair.engines.image import ImageEngine, RenderParams
from clair.engines.worker import WorkerImageEngine
from clair.service.studio import Studio, Token
from tests.ollama_standin import OllamaStandin

MODEL = "llama3.1:8b"


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


def chat_per_token_ms(engine, repeats: int) -> tuple[float, int]:
    """Best-of-`repeats` milliseconds per streamed piece of a tiny-model reply, and the pieces counted."""
    import threading as _threading

    best, count = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for text in engine.stream("tiny", [{"role": "user", "content": "tell me"}], _threading.Event()) if text)
        dt = time.perf_counter() - t0
        if n and dt / n < best:
            best, count = dt / n, n
    return best * 1000, count


def render_per_step_ms(engine, steps: int, repeats: int) -> float:
    params = RenderParams("a lighthouse at dusk", steps=steps, width=64, height=64, seed=1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.render(params, on_step=lambda n, t: None, checkpoint=lambda n, t: None)
        best = min(best, time.perf_counter() - t0)
    return best / steps * 1000


def mixed_on_cards(sizes: tuple[float, ...], tmp: Path, chats: int = 3, renders: int = 2) -> dict:
    """The mixed load on simulated cards of `sizes` GB, with workers; Ollama's runner on card 0."""
    path = tmp / f"cards-{'-'.join(f'{g:g}' for g in sizes)}" / "sim-gpu.json"
    standin = OllamaStandin({MODEL: 4.9}, load_delay=2.0, unload_delay=1.0, token_delay=0.04, sim_card=str(path))
    standin.reply_fn = lambda body: ["tok"] + [" tok"] * 19
    standin.start()
    cfg = dataclasses.replace(
        Config(), chat_backend="ollama", ollama_host=standin.host, image_model="tiny", workers="on",
        output_dir=str(path.parent / "out"), state_dir=str(path.parent / "state"), sim_gpu_gb=sizes[0],
        sim_gpu_cards=tuple(sizes) if len(sizes) > 1 else (), sim_gpu_file=str(path), ollama_gpus="0", warmup=True,
    )
    studio = Studio(cfg)
    studio.ollama.warm(MODEL)
    ttft: list[float] = []
    evicted: list[str] = []
    errors: list[str] = []

    def chat_user(i: int) -> None:
        for k in range(chats):
            t0 = time.monotonic()
            try:
                first = next(time.monotonic() - t0 for e in studio.chat(f"user {i} message {k}") if isinstance(e, Token))
            except Exception as exc:
                errors.append(f"chat: {exc}")
                continue
            ttft.append(first)
            time.sleep(1.0 + 0.3 * i)

    def image_user() -> None:
        for k in range(renders):
            try:
                _, info = studio.render(RenderParams("bench", steps=4, width=512, height=512, seed=k))
            except Exception as exc:
                errors.append(f"render: {exc}")
                continue
            evicted.extend(info["evicted"])
            time.sleep(1.5)

    users = [threading.Thread(target=chat_user, args=(i,)) for i in range(3)] + [threading.Thread(target=image_user)]
    for t in users:
        t.start()
    for t in users:
        t.join(300)
    unloads = sum(1 for e in standin.events_for(MODEL) if e.kind == "unloaded")
    swaps = sum(a.status()["stats"]["swaps"] for a in studio.arbiters)
    studio.image.close()
    standin.stop()
    ttft.sort()
    return {
        "cards": "+".join(f"{g:g} GB" for g in sizes),
        "ollama_unloads": unloads,
        "swaps": swaps,
        "render_evictions": len(evicted),
        "chat_ttft_p50_s": round(ttft[len(ttft) // 2], 3) if ttft else None,
        "chat_ttft_max_s": round(ttft[-1], 3) if ttft else None,
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--cards", action="store_true", help="only the mixed load on one card, then on two")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clair-bench-worker-"))
    if args.cards:
        for sizes in ((12.0,), (12.0, 24.0)):
            print(mixed_on_cards(sizes, tmp))
        return
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
    print(f"a token-sized message one way over the same transport ({args.tokens} messages): {tok:.1f} us")
    worker.close()

    from clair.engines.chat import LocalChat
    from clair.engines.worker import WorkerLocalChat

    chat_cfg = dataclasses.replace(cfg, local_chat_model="tiny")
    here_chat = LocalChat(chat_cfg)
    here_chat.load()
    there_chat = WorkerLocalChat(chat_cfg)
    there_chat.load()
    (a, n1), (b, n2) = chat_per_token_ms(here_chat, args.repeats), chat_per_token_ms(there_chat, args.repeats)
    print(f"chat per token (tiny model, best of {args.repeats}): in this process {a:.2f} ms ({n1} pieces), "
          f"in the worker {b:.2f} ms ({n2} pieces), difference {b - a:+.2f} ms; a token costs one round trip "
          f"(about {p50:.0f} us)")
    there_chat.close()


if __name__ == "__main__":
    main()
