"""A waiting request costs no thread (arbiter invariant 11, clair/service/front.py).

256 requests wait at once, behind a render that holds the GPU, and the process's thread count is what it was
before they came: each is a future the arbiter completes when it grants, not a thread blocked on a condition.
First on the arbiter alone (`Lease.wait_async`), then through the front door (`Studio.job(...).chat()`) with
the house cap raised to 256 and the Ollama stand-in behind it, where the front door's worker pool is cut to
one thread: had a waiting job held a thread, the second job could not even have joined the queue. The
figures (memory per waiter, time to queue them) are printed by bench/waiting.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import tracemalloc
from collections import Counter

import pytest

from clair.arbiter import Arbiter, GiB
from clair.base.config import Config
from clair.base.errors import Cancelled, GpuBusy
from clair.service import front as service
from clair.service.events import Token, Waiting
from clair.service.studio import Studio
from tests.ollama_standin import OllamaStandin

N = 256
MODEL = "llama3.1:8b"


async def until(predicate, timeout: float = 60.0) -> None:
    """A bounded wait on the event loop (no sleep-and-hope: it checks on every turn of the loop)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def clair_threads() -> list[str]:
    """This process's threads less the Ollama stand-in's (in real life another program: its server thread
    and one per open connection from Clair's Ollama client)."""
    standin = ("serve_forever", "process_request_thread", "ollama-standin")
    return [t.name for t in threading.enumerate() if not any(s in t.name for s in standin)]


def idle_pool_worker(thread: threading.Thread) -> bool:
    """A worker of anyio's thread pool parked on its queue, waiting for work: after a burst of requests (the guard
    parses JSON bodies off the event loop, clair/edge/guard.py) anyio keeps such a thread ~10 s. It holds nothing
    for anyone; a thread kept by a waiting request would be elsewhere (blocked in the arbiter, or in I/O)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        caller = frame.f_back
        if frame.f_code.co_name == "get" and frame.f_code.co_filename.endswith("queue.py"):
            return caller is not None and "anyio" in caller.f_code.co_filename
        frame = caller
    return False


def busy_clair_threads() -> list[str]:
    """clair_threads() less anyio's idle pool workers."""
    names = clair_threads()
    for t in threading.enumerate():
        if idle_pool_worker(t) and t.name in names:
            names.remove(t.name)
    return names


def blocked_in_the_arbiter() -> list[str]:
    """Threads whose stack is inside a lease's blocking wait (the old way of waiting)."""
    found = []
    for ident, frame in sys._current_frames().items():
        f = frame
        while f is not None:
            if f.f_code.co_name in ("poll", "wait_for") and "arbiter" in f.f_code.co_filename:
                found.append(str(ident))
                break
            f = f.f_back
    return found


def test_256_leases_wait_on_the_event_loop_without_a_thread_each():
    arb = Arbiter(policy="exclusive")
    render = arb.request("render", "image", 8 * GiB, 4 * GiB).wait()

    async def main():
        before = threading.active_count()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        leases = [arb.request("chat", "ollama", 4 * GiB) for _ in range(N)]
        tasks = [asyncio.create_task(ls.wait_async(timeout=60)) for ls in leases]
        await until(lambda: all(ls._futures for ls in leases))  # every one is parked on its future
        waiting_bytes = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert arb.count("chat") == N and not any(t.done() for t in tasks)
        # 256 waiters, no new thread (one an earlier test left may end meanwhile: a gradio_client's, say)
        assert threading.active_count() <= before
        assert not blocked_in_the_arbiter()
        # A waiter costs a lease, a future and a suspended task: a few kB, not a thread's stack.
        assert waiting_bytes / N < 16 * 1024, waiting_bytes / N
        render.release()  # the chats run together once the render is done
        granted = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert all(ls.ready_at is not None for ls in granted)
        for ls in granted:
            ls.release()
        assert arb.is_idle()

    asyncio.run(main())


def test_a_waiter_on_the_loop_times_out_or_is_cancelled_and_gives_its_place_back():
    arb = Arbiter(policy="exclusive")
    render = arb.request("render", "image", 8 * GiB, 4 * GiB).wait()

    async def main():
        late = arb.request("chat", "ollama", GiB)
        with pytest.raises(GpuBusy, match="CLAIR_QUEUE_TIMEOUT_S"):
            await late.wait_async(timeout=0.05, tick=0.01)
        stop = threading.Event()
        stopped = arb.request("chat", "ollama", GiB)
        task = asyncio.create_task(stopped.wait_async(cancelled=stop.is_set, tick=0.01))
        stop.set()
        with pytest.raises(Cancelled):
            await task
        dropped = arb.request("chat", "ollama", GiB)
        task = asyncio.create_task(dropped.wait_async())
        await until(lambda: dropped._futures)
        task.cancel()  # the client went away (asyncio cancels its handler's task)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert late.released_at and stopped.released_at and dropped.released_at
        assert arb.count("chat") == 0
        render.release()
        assert arb.is_idle()

    asyncio.run(main())


def test_evictions_of_an_awaited_grant_run_in_a_worker_and_count_until_done():
    """A grant with evictions: they run off the loop, and a cancel meanwhile releases only once they are done
    (a tenant counts in the ledger until its evict() has returned, invariant 4)."""
    arb = Arbiter(policy="exclusive")
    entered, leave = threading.Event(), threading.Event()
    on_loop = []

    def evict():
        on_loop.append(threading.current_thread() is threading.main_thread())
        entered.set()
        leave.wait(10)

    arb.add_tenant("ollama", evict)
    arb.request("chat", "ollama", GiB).wait().release()  # ollama stays resident, idle

    async def main():
        render = arb.request("render", "image", 8 * GiB, 4 * GiB)
        task = asyncio.create_task(render.wait_async())
        await until(entered.is_set)
        task.cancel()
        await asyncio.sleep(0)
        assert arb._residents["ollama"].evicting  # still leaving: nobody may plan on its memory yet
        assert render.released_at is None
        leave.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: render.released_at is not None)
        assert "ollama" not in arb._residents and arb.is_idle()

    asyncio.run(main())
    assert on_loop == [False]


@pytest.fixture
def standin():
    s = OllamaStandin({MODEL: 4.9}, num_parallel=N).start()
    yield s
    s.stop()


def test_256_jobs_through_the_front_door_hold_no_thread_while_they_wait(standin, tmp_path, monkeypatch):
    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path),
        state_dir=str(tmp_path / "state"),
        warmup=False,
        max_queue=N,
        max_jobs_per_user=N,
    )
    studio = Studio(cfg)
    render = studio.arbiter.request("render", studio.image.tenant, 8 * GiB, 4 * GiB).wait()  # a render holds it
    monkeypatch.setattr(service, "GPU_THREADS", 1)  # one worker thread for every job's work

    async def one(i: int) -> tuple[str, int]:
        waits, text = 0, ""
        with studio.job(f"user:{i % 7}", owner=f"u{i % 7}") as job:
            async for event in job.chat(f"hi {i}"):
                if isinstance(event, Waiting):
                    waits += 1
                elif isinstance(event, Token):
                    text += event.text
        return text, waits

    async def main():
        await service.in_thread(lambda: None)  # the front door's one worker exists before we count
        before = clair_threads()
        tasks = [asyncio.create_task(one(i)) for i in range(N)]
        await until(lambda: studio.arbiter.count("chat") == N)
        assert studio.jobs.snapshot()["total"] == N
        assert not Counter(clair_threads()) - Counter(before)  # 256 jobs waiting, not one thread more
        assert not blocked_in_the_arbiter()
        with pytest.raises(GpuBusy, match="CLAIR_MAX_QUEUE"), studio.job("user:late"):
            pass  # the house is full: the 257th is refused at the door
        # Most clients go away while they wait (their handlers' tasks are cancelled): each gives its lease
        # and its slot back. Then the render ends, and the rest are answered.
        KEEP = 8
        for t in tasks[KEEP:]:
            t.cancel()
        await asyncio.gather(*tasks[KEEP:], return_exceptions=True)
        assert studio.arbiter.count("chat") == KEEP and studio.jobs.snapshot()["total"] == KEEP
        render.release()
        results = await asyncio.wait_for(asyncio.gather(*tasks[:KEEP]), 60)
        assert sorted(text for text, _ in results) == sorted(f"You said: hi {i}" for i in range(KEEP))
        assert all(waits >= 1 for _, waits in results)  # each saw its place in the queue

    asyncio.run(main())
    assert studio.jobs.snapshot()["total"] == 0 and studio.arbiter.is_idle()
    assert studio.cancel_jobs() == 0


def test_a_job_left_mid_reply_is_closed_off_the_event_loop(standin, tmp_path):
    """A client that goes away mid-reply: Gradio (or the API) closes the handler on its event loop; the
    lease's release and the engines' hooks (HTTP to Ollama) run in a worker thread, never on the loop."""
    cfg = dataclasses.replace(
        Config(), chat_backend="ollama", ollama_host=standin.host, image_model="tiny", output_dir=str(tmp_path),
        state_dir=str(tmp_path / "state"), warmup=False,
    )
    studio = Studio(cfg)
    released_in = []
    release = studio._release

    def recording(lease):
        released_in.append(threading.current_thread())
        release(lease)

    studio._release = recording  # type: ignore[method-assign]
    standin.queue_reply(["one ", "two ", "three"])

    async def main():
        with studio.job("user:a", cancel_key="chat:page") as job:
            events = job.chat("hi")
            async for event in events:
                if isinstance(event, Token):
                    break  # the client went away after the first token
            await events.aclose()
        return threading.current_thread()

    loop_thread = asyncio.run(main())
    assert released_in and loop_thread not in released_in
    assert studio.arbiter.is_idle() and studio.jobs.snapshot()["total"] == 0 and not studio.running("chat:page")


def test_256_requests_on_the_ollama_port_wait_without_a_server_thread(standin, tmp_path, monkeypatch):
    """The same over HTTP: 256 `/api/chat` requests from other programs wait on the Ollama-compatible port
    (uvicorn, the gateway's guard and adapter, the front door) while a render holds the GPU, and the server
    has not one thread more. Most clients then hang up (each frees its place); the rest are answered."""
    import httpx

    from tests.gateway_support import Served, gateway_app, make_studio

    monkeypatch.setattr(service, "GPU_THREADS", 1)
    # The caps raised: the house, one address (all of these come from 127.0.0.1), and its connections (the guard
    # lets one address hold a quarter of CLAIR_MAX_CONNECTIONS).
    studio = make_studio(standin, tmp_path, max_queue=N, max_jobs_per_user=N, max_connections=4 * N + 64)
    served = Served(gateway_app(studio))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=httpx.Limits(max_connections=None)) as c:
            first = await c.post("/api/chat", json=body)  # the server's worker threads exist before we count
            assert first.status_code == 200, first.text
            render = studio.arbiter.request("render", studio.image.tenant, 8 * GiB, 4 * GiB).wait()
            before = busy_clair_threads()
            tasks = [asyncio.create_task(c.post("/api/chat", json=body)) for _ in range(N)]
            await until(lambda: studio.arbiter.count("chat") == N)
            # Not one thread more is doing anything once the last arrivals are through (their JSON bodies, parsed in
            # anyio's pool, may leave idle workers behind for ~10 s): a thread held by a waiter never settles.
            try:
                await until(lambda: len(busy_clair_threads()) <= len(before), timeout=10)
            except TimeoutError:
                raise AssertionError((before, busy_clair_threads())) from None
            assert not blocked_in_the_arbiter()
            KEEP = 8
            for t in tasks[KEEP:]:
                t.cancel()  # the client hangs up: the gateway sees the disconnect, the job gives its place back
            await asyncio.gather(*tasks[KEEP:], return_exceptions=True)
            await until(lambda: studio.arbiter.count("chat") == KEEP and studio.jobs.snapshot()["total"] == KEEP)
            render.release()
            answers = await asyncio.wait_for(asyncio.gather(*tasks[:KEEP]), 60)
            assert [r.status_code for r in answers] == [200] * KEEP
            assert all(r.json()["message"]["content"] == "You said: hi" for r in answers)

    try:
        asyncio.run(main())
    finally:
        served.stop()
    assert studio.jobs.snapshot()["total"] == 0


def test_a_waiter_cancelled_as_it_is_granted_gives_the_grant_back():
    """The race a hung-up client meets: the grant completes the waiter's future, and the waiter is cancelled
    before it runs again. The lease it was granted must go back, or the GPU stays held by nobody."""
    arb = Arbiter(policy="exclusive")
    render = arb.request("render", "image", 8 * GiB, 4 * GiB).wait()

    async def main():
        chat = arb.request("chat", "ollama", GiB)
        task = asyncio.create_task(chat.wait_async())
        await until(lambda: chat._futures)
        render.release()  # grants the chat: its future is completed on the next turn of the loop
        assert chat._grant is not None and chat.released_at is None
        task.cancel()  # ... and the client is gone before the waiter has seen it
        with pytest.raises(asyncio.CancelledError):
            await task
        assert chat.released_at is not None and arb.is_idle()

    asyncio.run(main())
