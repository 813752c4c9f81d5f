"""What a waiting request costs: threads and memory, with hundreds queued behind a render.

    python bench/waiting.py                 # CPU, no GPU or network, ~1 minute
    python bench/waiting.py --leases 512 --jobs 512

Two measurements, each while a render holds the GPU and the requests wait for it:

* `--leases` arbiter leases awaited on an event loop (`Lease.wait_async`): the process's threads before and
  while they wait, the Python memory they take (tracemalloc) and the resident set's growth, and how long
  the arbiter takes to grant them all once the render is released.
* `--jobs` front-door jobs (`Studio.job(...).chat()`, the path of the tabs, `/v1` and the Ollama port)
  against the Ollama stand-in (tests/ollama_standin.py), CLAIR_MAX_QUEUE raised to match: the same
  figures, the stand-in's own threads left out (in real life it is another program).

Measured on the 2-core AMD EPYC VM (shared, no GPU), `python bench/waiting.py` (512 leases, 256 jobs): see
the figures in docs/design.md ("Waiting costs no thread").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clair.arbiter import Arbiter, GiB
from clair.base.config import Config
from clair.service import front as service
from clair.service.studio import Studio
from tests.ollama_standin import OllamaStandin

MODEL = "llama3.1:8b"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads() -> int:
    standin = ("serve_forever", "process_request_thread", "ollama-standin")
    return sum(1 for t in threading.enumerate() if not any(s in t.name for s in standin))


def blocked() -> int:
    """Threads whose stack is in a lease's blocking wait (Lease.poll: how requests used to wait)."""
    n = 0
    for frame in sys._current_frames().values():
        f = frame
        while f is not None and not (f.f_code.co_name == "poll" and "arbiter" in f.f_code.co_filename):
            f = f.f_back
        n += f is not None
    return n


async def until(predicate, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def report(what: str, n: int, t_before: int, t_during: int, py_bytes: int, rss: int, queue_s: float) -> None:
    print(f"{what}: {n} waiting")
    print(f"  threads          {t_before} before, {t_during} while they wait")
    print(f"  python memory    {py_bytes / 2**20:.2f} MiB in all, {py_bytes / n / 1024:.1f} KiB each (tracemalloc)")
    print(f"  resident growth  {rss / 2**20:.2f} MiB (VmRSS, without tracemalloc)")
    print(f"  queued in        {queue_s:.2f} s (without tracemalloc)")


def leases(n: int) -> None:
    arb = Arbiter(policy="exclusive")
    render = arb.request("render", "image", 8 * GiB, 4 * GiB).wait()

    async def queue(traced: bool):
        if traced:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0] if traced else 0
        t_before, rss0, t0 = threads(), rss_kib(), time.monotonic()
        waiting = [arb.request("chat", "ollama", 4 * GiB) for _ in range(n)]
        tasks = [asyncio.create_task(ls.wait_async()) for ls in waiting]
        await until(lambda: all(ls._futures for ls in waiting))
        figures = (t_before, threads(), tracemalloc.get_traced_memory()[0] - base if traced else 0,
                   (rss_kib() - rss0) * 1024, time.monotonic() - t0)
        if traced:
            tracemalloc.stop()
        for ls in waiting:
            ls.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        return figures

    async def main():
        py = (await queue(traced=True))[2]
        t_before, t_during, _, rss, queue_s = await queue(traced=False)
        report("arbiter leases (Lease.wait_async)", n, t_before, t_during, py, rss, queue_s)
        waiting = [arb.request("chat", "ollama", 4 * GiB) for _ in range(n)]
        tasks = [asyncio.create_task(ls.wait_async()) for ls in waiting]
        await until(lambda: all(ls._futures for ls in waiting))
        t0 = time.monotonic()
        render.release()
        await asyncio.gather(*tasks)
        print(f"  all granted in   {time.monotonic() - t0:.3f} s after the render's release")
        for ls in waiting:
            ls.release()

    asyncio.run(main())


def jobs(n: int) -> None:
    standin = OllamaStandin({MODEL: 4.9}).start()
    tmp = Path(tempfile.mkdtemp(prefix="clair-bench-waiting-"))
    try:
        cfg = dataclasses.replace(
            Config(), chat_backend="ollama", ollama_host=standin.host, image_model="tiny", output_dir=str(tmp),
            state_dir=str(tmp / "state"), warmup=False, max_queue=max(n, 1), max_jobs_per_user=max(n, 1),
        )
        studio = Studio(cfg)
        render = studio.arbiter.request("render", studio.image.tenant, 8 * GiB, 4 * GiB).wait()

        async def one(i: int) -> None:
            with studio.job(f"user:{i % 7}") as job:
                async for _ in job.chat(f"hi {i}"):
                    pass

        async def queue(traced: bool):
            if traced:
                tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0] if traced else 0
            t_before, rss0, t0 = threads(), rss_kib(), time.monotonic()
            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await until(lambda: studio.arbiter.count("chat") == n)
            figures = (t_before, threads(), tracemalloc.get_traced_memory()[0] - base if traced else 0,
                       (rss_kib() - rss0) * 1024, time.monotonic() - t0, blocked())
            if traced:
                tracemalloc.stop()
            for t in tasks:
                t.cancel()  # the clients go away: every lease and slot must come back
            await asyncio.gather(*tasks, return_exceptions=True)
            return figures

        async def main():
            # The front door's worker pool (service.GPU_THREADS, the threads GPU work runs in) and the Ollama
            # client's connection exist before counting: they are the server's, not the waiters'.
            await service.in_thread(studio.sync)
            await asyncio.gather(*(service.in_thread(time.sleep, 0.2) for _ in range(service.GPU_THREADS)))
            py = (await queue(traced=True))[2]
            t_before, t_during, _, rss, queue_s, stuck = await queue(traced=False)
            report("front-door jobs (Studio.job().chat())", n, t_before, t_during, py, rss, queue_s)
            print(f"  threads blocked in a wait for the GPU: {stuck}")
            left = studio.arbiter.count("chat"), studio.jobs.snapshot()["total"]
            print(f"  after the clients left: {left[0]} leases, {left[1]} job slots held")

        asyncio.run(main())
        render.release()
    finally:
        standin.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--leases", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=256)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {threading.active_count()} threads at start")
    if args.leases:
        leases(args.leases)
    if args.jobs:
        jobs(args.jobs)


if __name__ == "__main__":
    main()
