"""Clair's Ollama-compatible port (clair/adapters/gateway.py), driven by the official `ollama` client as another
program on the box would, with Ollama played by the stand-in. In-process: Studio + the gateway app on
uvicorn in a thread; what reached "Ollama" is read from the stand-in's own logs."""

from __future__ import annotations

import threading
import time

import httpx
import ollama
import pytest

from clair.engines import chat as chat_engine
from clair.engines.image import RenderParams
from tests.gateway_support import Served, gateway_app, hold_render, make_studio
from tests.ollama_standin import OllamaStandin

MODEL = "llama3.1:8b"
SMALL = "qwen2.5:0.5b"


@pytest.fixture
def standin():
    s = OllamaStandin({MODEL: 4.9, SMALL: 0.4}, unload_delay=0.2, token_delay=0.01).start()
    yield s
    s.stop()


@pytest.fixture
def studio(standin, tmp_path):
    return make_studio(standin, tmp_path, preempt="off")


@pytest.fixture
def gateway(studio):
    served = Served(gateway_app(studio))
    yield served
    served.stop()


def real_chats(standin):
    return [r for r in standin.requests_to("/api/chat") if r.messages]


def test_chat_streams_and_clair_decides_keep_alive_and_num_ctx(gateway, standin, studio):
    client = ollama.Client(host=gateway.url)
    parts = [
        c.message.content
        for c in client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "hello there"}],
            stream=True,
            keep_alive=-1,  # would pin the model forever
            options={"num_ctx": 32768, "temperature": 0.5},
        )
    ]
    assert len(parts) >= 3 and "".join(parts) == "You said: hello there"
    (sent,) = real_chats(standin)
    assert sent.keep_alive == "30m"  # Clair's CLAIR_KEEP_ALIVE, not -1
    assert sent.options["num_ctx"] == studio.cfg.chat_num_ctx  # replaced, not the client's 32768
    assert sent.options["temperature"] == 0.5  # everything else as the client sent it
    # A shorter keep_alive is the client's to choose.
    client.chat(model=MODEL, messages=[{"role": "user", "content": "again"}], keep_alive="10s")
    assert real_chats(standin)[-1].keep_alive == "10s"
    standin.wait_until(studio.arbiter.is_idle)


def test_generate_streaming_and_not(gateway, standin):
    client = ollama.Client(host=gateway.url)
    whole = client.generate(model=MODEL, prompt="one two", stream=False)
    assert whole.response == "You said: one two" and whole.done
    parts = [c.response for c in client.generate(model=MODEL, prompt="three four", stream=True)]
    assert len(parts) >= 2 and "".join(parts) == "You said: three four"


def test_a_chat_sent_during_a_render_is_held_until_the_render_ends(gateway, standin, studio):
    client = ollama.Client(host=gateway.url)
    client.chat(model=MODEL, messages=[{"role": "user", "content": "warm"}])
    _, leave, render, result = hold_render(studio)
    standin.reset_logs()
    got: dict = {}

    def chat():
        got["parts"] = [
            c.message.content
            for c in client.chat(model=MODEL, messages=[{"role": "user", "content": "held?"}], stream=True)
        ]
        got["at"] = time.time()

    t = threading.Thread(target=chat)
    t.start()
    try:
        # It waits in Clair's queue, labelled for the program that sent it, and has not reached Ollama.
        waiting = standin.wait_until(lambda: studio.arbiter.status()["waiting"], timeout=10)
        assert waiting[0]["label"] == f"api:{MODEL} (127.0.0.1)"
        time.sleep(0.5)
        assert not real_chats(standin)
        assert "parts" not in got
    finally:
        leave.set()
    render.join(30)
    t.join(30)
    assert "".join(got["parts"]) == "You said: held?"
    (sent,) = real_chats(standin)
    # Held until the render's tail (its denoising done, only the decode left: the chat fits beside it) or end.
    assert sent.arrived >= (result["info"]["tail_at"] or result["info"]["gpu_finished_at"])
    standin.wait_until(studio.arbiter.is_idle)


def test_nan_and_over_long_requests_are_refused_before_the_gpu(gateway, standin, studio):
    import httpx

    grants = studio.arbiter.stats["grants"]
    standin.reset_logs()
    url = gateway.url + "/api/chat"
    nan = b'{"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": NaN}}'
    r = httpx.post(url, content=nan, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "NaN is not a JSON number" in r.json()["error"]
    long = "x" * (studio.cfg.max_history_chars + studio.cfg.max_message_chars + 1)
    client = ollama.Client(host=gateway.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=MODEL, messages=[{"role": "user", "content": long}])
    assert err.value.status_code == 400 and "CLAIR_MAX_HISTORY_CHARS" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=MODEL, prompt="y" * (studio.cfg.max_message_chars + 1))
    assert err.value.status_code == 400 and "CLAIR_MAX_MESSAGE_CHARS" in err.value.error
    assert studio.arbiter.stats["grants"] == grants and not real_chats(standin)


def test_tags_ps_show_and_version_answer_as_ollama_does(gateway, standin):
    through, direct = ollama.Client(host=gateway.url), ollama.Client(host=standin.url)
    assert through.list() == direct.list()
    through.chat(model=MODEL, messages=[{"role": "user", "content": "load it"}])
    ps_through, ps_direct = through.ps(), direct.ps()
    assert [m.model for m in ps_through.models] == [MODEL]

    def comparable(resp):  # expires_at is computed when each answer is made
        return [m.model_dump(exclude={"expires_at"}) for m in resp.models]

    assert comparable(ps_through) == comparable(ps_direct)
    assert through.show(MODEL) == direct.show(MODEL)
    assert httpx.get(gateway.url + "/api/version").json() == httpx.get(standin.url + "/api/version").json()
    assert httpx.get(gateway.url + "/").text == "Ollama is running"
    with pytest.raises(ollama.ResponseError) as err:
        through.show("nope:1b")
    assert err.value.status_code == 404 and "not found" in err.value.error


def test_ollamas_errors_come_back_with_its_status(gateway, standin, studio):
    client = ollama.Client(host=gateway.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="missing:7b", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and err.value.error == "model 'missing:7b' not found"
    grants = studio.arbiter.stats["grants"]
    with pytest.raises(ollama.ResponseError) as err:  # Ollama refuses a unit-less string, so does Clair
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], keep_alive="300")
    assert err.value.status_code == 400 and err.value.error == 'time: missing unit in duration "300"'
    assert studio.arbiter.stats["grants"] == grants  # refused before it asked for the GPU
    standin.fail_next(MODEL, after_chunks=1, error="runner crashed")
    with pytest.raises(ollama.ResponseError) as err:  # an error line mid-stream, relayed as it came
        list(client.chat(model=MODEL, messages=[{"role": "user", "content": "a b c"}], stream=True))
    assert "runner crashed" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.pull(MODEL)
    assert err.value.status_code == 403
    standin.wait_until(studio.arbiter.is_idle)


def test_a_model_ollama_does_not_have_is_refused_without_the_gpu_and_the_image_model_stays(
    gateway, standin, studio, monkeypatch
):
    """A made-up name used to be leased (sized as an unknown 8B model) before Ollama's instant 404: each one
    could evict the image model. Now Clair reads Ollama's list and answers Ollama's 404 itself."""
    client = ollama.Client(host=gateway.url)
    studio.render(RenderParams("warm", steps=1, width=64, height=64, seed=1))  # the image model is loaded
    grants, requests = studio.arbiter.stats["grants"], len(standin.requests_to("/api/chat"))
    for path in ("chat", "generate"):
        with pytest.raises(ollama.ResponseError) as err:
            if path == "chat":
                client.chat(model="no-such-model:latest", messages=[{"role": "user", "content": "hi"}])
            else:
                client.generate(model="no-such-model:latest", prompt="hi")
        assert err.value.status_code == 404 and err.value.error == "model 'no-such-model:latest' not found"
    with pytest.raises(ollama.ResponseError) as err:  # a long name is not repeated back
        client.chat(model="x" * 5000, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and "x" * 100 not in err.value.error and "5000 characters" in err.value.error
    v1 = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "nope:1b", "messages": [{"role": "user", "content": "hi"}]})
    assert v1.status_code == 404 and v1.json()["error"]["code"] == "model_not_found"
    assert studio.arbiter.stats["grants"] == grants  # no lease, so no eviction
    assert len(standin.requests_to("/api/chat")) == requests
    assert studio.arbiter.resident_bytes(studio.image.tenant) > 0
    # A model pulled a moment ago is found (the list is read again), and its chat goes through.
    # (Names not in the last list are looked up again at most every TAGS_RECHECK_S; here at once.)
    monkeypatch.setattr(chat_engine, "TAGS_RECHECK_S", 0.0)
    standin.add_model("fresh:1b", 0.5)
    reply = client.chat(model="fresh:1b", messages=[{"role": "user", "content": "still fine"}])
    assert reply.message.content == "You said: still fine"
    standin.wait_until(studio.arbiter.is_idle)


def test_load_takes_the_gpu_and_unload_only_updates_the_ledger(gateway, standin, studio):
    client = ollama.Client(host=gateway.url)
    grants = studio.arbiter.stats["grants"]
    loaded = client.generate(model=SMALL, prompt="", keep_alive=-1)  # a load request
    assert loaded.done_reason == "load"
    assert studio.arbiter.stats["grants"] == grants + 1
    (load,) = standin.requests_to("/api/generate", SMALL)
    assert load.keep_alive == "30m"
    assert studio.arbiter.resident_bytes("ollama") > 0

    # An unload frees memory: no lease, sent as the client sent it, and the ledger follows /api/ps.
    _, leave, render, _ = hold_render(studio)
    try:
        gone = client.chat(model=SMALL, messages=[], keep_alive=0)  # not held by the render
        assert gone.done_reason == "unload"
    finally:
        leave.set()
        render.join(30)
    assert studio.arbiter.stats["grants"] == grants + 2  # the render's only
    standin.wait_until(lambda: not standin.loaded())
    time.sleep(2.1)  # past the 2 s the /status reading is kept
    standin.wait_until(lambda: not [r for r in studio.status()["resident"] if r["tenant"] == "ollama"])


@pytest.mark.parametrize(
    ("policy", "budget_gb", "model", "evicted"),
    [
        ("exclusive", 0.0, SMALL, True),
        ("budget", 10.0, MODEL, True),  # SDXL (~7 GiB) and an 8B model (~5.3 GiB) do not fit in 10 GiB
        ("budget", 40.0, SMALL, False),  # it fits beside the render: the budget policy keeps it, counted
    ],
)
def test_a_model_loaded_behind_clairs_back_is_seen_and_evicted_before_a_render_it_does_not_fit_beside(
    standin, tmp_path, policy, budget_gb, model, evicted
):
    from clair.engines.image import RenderParams

    studio = make_studio(standin, tmp_path, gpu_policy=policy, vram_budget_gb=budget_gb)
    # Another program talks to Ollama directly, not through Clair.
    ollama.Client(host=standin.url).generate(model=model, prompt="", keep_alive=-1)
    assert standin.loaded() == [model]
    st = studio.status()
    assert [m["model"] for m in st["ollama_models"]] == [model]
    (seen,) = [r for r in st["resident"] if r["tenant"] == "ollama"]
    assert seen["gb"] == pytest.approx(standin.ps()[0]["size_vram"] / 1024**3, abs=0.01)

    _, info = studio.render(RenderParams("x", steps=2, width=64, height=64))
    if evicted:
        assert "ollama" in info["evicted"]
        unloaded = next(e.at for e in standin.events_for(model) if e.kind == "unloaded")
        assert unloaded <= info["gpu_started_at"]
        assert standin.loaded() == []
    else:
        assert info["evicted"] == [] and standin.loaded() == [model]
        assert studio.arbiter.stats["budget_exceeded"] == 0


def test_from_another_machine_the_ollama_port_needs_a_key(standin, tmp_path):
    """Clair with users, serving the LAN; requests arrive from a LAN address (an in-memory transport
    stamps it), and from loopback, which needs no key (Ollama answers loopback without one anyway)."""
    import asyncio

    from clair.edge.keys import Keys, keys_path
    from clair.edge.users import Users

    studio = make_studio(standin, tmp_path, host="0.0.0.0")
    Users(studio.cfg.users_path).set_password("alice", "correct horse battery")
    key, _ = Keys(keys_path(studio.cfg.users_path), Users(studio.cfg.users_path)).add("alice")
    app = gateway_app(studio)

    def lan_client(**kw) -> ollama.AsyncClient:
        transport = httpx.ASGITransport(app, client=("192.168.1.20", 40000))
        return ollama.AsyncClient(host="http://127.0.0.1:11434", transport=transport, **kw)

    async def run():
        for headers in ({}, {"Authorization": "Bearer clair-wrong"}):
            with pytest.raises(ollama.ResponseError) as err:
                await lan_client(headers=headers).list()
            assert err.value.status_code == 401 and "key" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            await lan_client(headers=headers).chat(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 401
        ok = lan_client(headers={"Authorization": f"Bearer {key}"})
        assert [m.model for m in (await ok.list()).models] == [MODEL, SMALL]
        reply = await ok.chat(model=MODEL, messages=[{"role": "user", "content": "from the lan"}])
        assert reply.message.content == "You said: from the lan"
        # A web page of another site cannot drive it, key or not.
        evil = lan_client(headers={"Authorization": f"Bearer {key}", "Origin": "http://evil.example"})
        with pytest.raises(ollama.ResponseError) as err:
            await evil.chat(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 403

    asyncio.run(run())
    assert [r.messages[-1]["content"] for r in real_chats(standin)] == ["from the lan"]
    served = Served(app)  # loopback: no key
    try:
        assert ollama.Client(host=served.url).chat(model=MODEL, messages=[{"role": "user", "content": "here"}])
    finally:
        served.stop()


def test_a_client_that_gives_up_while_held_leaves_the_queue_and_never_reaches_ollama(gateway, standin, studio):
    _, leave, render, _ = hold_render(studio)
    try:
        impatient = ollama.Client(host=gateway.url, timeout=1.0)
        with pytest.raises(httpx.TimeoutException):  # it hangs up after 1 s
            impatient.chat(model=MODEL, messages=[{"role": "user", "content": "bye"}])
        standin.wait_until(lambda: not studio.arbiter.status()["waiting"], timeout=5)
    finally:
        leave.set()
        render.join(30)
    standin.wait_until(studio.arbiter.is_idle)
    assert not real_chats(standin)


def test_embeddings_take_the_gpu_too(gateway, standin, studio):
    """The stand-in has no /api/embed: Ollama's 404 comes back, after the request held a lease."""
    grants = studio.arbiter.stats["grants"]
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=gateway.url).embed(model=MODEL, input="hello")
    assert err.value.status_code == 404
    assert studio.arbiter.stats["grants"] == grants + 1
    (sent,) = standin.requests_to("/api/embed")
    assert sent.method == "POST"


def test_v1_on_the_ollama_port_is_ollamas_own_forwarded_through_the_gate(gateway, standin, studio):
    """Tools that expect Ollama's own OpenAI-compatible /v1 on Ollama's port get Ollama's: its model list (the
    one /api/tags gives), its answers with their `usage`, the request forwarded as sent (`tools` included), and
    held while a render has the GPU, like /api/chat."""
    import openai

    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="ollama", max_retries=0, timeout=60)
    assert [m.id for m in c.models.list()] == [m.model for m in ollama.Client(host=gateway.url).list().models]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    _, leave, render, _ = hold_render(studio)
    answer: dict = {}

    def ask():
        answer["r"] = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "via v1"}], tools=tools
        )

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        standin.wait_until(lambda: studio.arbiter.status()["waiting"], timeout=10)
        assert not standin.requests_to("/v1/chat/completions")  # held back while the render runs
    finally:
        leave.set()
        render.join(30)
        asking.join(60)
    r = answer["r"]
    assert r.choices[0].message.content == "You said: via v1"
    assert r.usage is not None and r.usage.completion_tokens > 0  # Ollama's usage, carried through
    (sent,) = standin.requests_to("/v1/chat/completions")
    assert sent.body["tools"] == tools and sent.body["model"] == MODEL  # forwarded as sent
    standin.wait_until(studio.arbiter.is_idle)


def test_many_clients_at_once_never_reach_ollama_while_a_render_holds_the_gpu(gateway, standin, studio):
    """Three programs chatting through the gate (both APIs, streaming or not, asking for odd keep_alive
    and num_ctx) for as long as renders come and go: no generation runs at Ollama during any render,
    and the model is out of Ollama's memory for every render."""
    import openai

    from clair.engines.image import RenderParams
    from tests.gateway_support import Served, v1_app

    studio.image.load()  # from disk first, so the chats really meet the renders
    v1 = Served(v1_app(studio))
    renders: list[dict] = []
    errors: list[BaseException] = []
    answered: list[str] = []
    done = threading.Event()

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported below
                errors.append(exc)
                done.set()

        return threading.Thread(target=run)

    def ollama_chats(i):
        c = ollama.Client(host=gateway.url)
        n = 0
        while not done.is_set():
            text = f"c{i} m{n}"
            if n % 2:
                got = "".join(
                    ch.message.content
                    for ch in c.chat(model=MODEL, messages=[{"role": "user", "content": text}], stream=True, keep_alive=-1)
                )
            else:
                got = c.generate(model=MODEL, prompt=text, options={"num_ctx": 1024 * (i + 1)}).response
            assert got == f"You said: {text}"
            answered.append(text)
            n += 1

    def openai_chats():
        c = openai.OpenAI(base_url=v1.url + "/v1", api_key="x", max_retries=0, timeout=60)
        n = 0
        while not done.is_set():
            r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"o{n}"}])
            assert r.choices[0].message.content == f"You said: o{n}"
            answered.append(f"o{n}")
            n += 1

    def render_loop():
        slow = lambda text, frac: time.sleep(0.1 if text.startswith("Step") else 0)  # noqa: E731 (renders that last)
        try:
            for n in range(3):
                time.sleep(0.3)
                renders.append(studio.render(RenderParams(f"r{n}", steps=4, width=64, height=64), slow)[1])
        finally:
            done.set()

    threads = [guard(lambda i=i: ollama_chats(i)) for i in range(2)] + [guard(openai_chats), guard(render_loop)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        v1.stop()
    assert not errors, errors
    assert len(renders) == 3
    generations = [r for p in ("/api/chat", "/api/generate") for r in standin.requests_to(p) if r.messages or r.prompt]
    assert len(generations) == len(answered) >= 6
    for info in renders:
        for g in generations:
            # From the render's tail on (only its decode left) a chat fits beside it.
            assert g.finished <= info["gpu_started_at"] or g.arrived >= (info["tail_at"] or info["gpu_finished_at"]), (
                g,
                info,
            )
        # And the model was out of Ollama's memory for the whole render (they do not fit together).
        state = None
        for e in standin.events_for(MODEL):
            if e.at <= info["gpu_started_at"]:
                state = {"load_start": "loading", "loaded": "ready", "unloaded": None}.get(e.kind, state)
            elif e.at < (info["tail_at"] or info["gpu_finished_at"]):
                assert e.kind != "load_start", (e, info)
        assert state is None, (state, info)
    assert all(g.options.get("num_ctx") == studio.cfg.chat_num_ctx for g in generations)
    assert studio.arbiter.stats["budget_exceeded"] == 0
    standin.wait_until(studio.arbiter.is_idle)


def test_ollama_port_requests_count_against_the_per_user_caps(gateway, standin, studio):
    """The same caps on the Ollama port: an anonymous loopback client counts by its address."""
    from clair.service.limits import JobCounter

    studio.jobs = JobCounter(max_per_user=1, max_total=16)
    assert studio.jobs.try_take("address:127.0.0.1") is None  # e.g. a render from a browser on this machine
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=gateway.url).chat(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 429 and "CLAIR_MAX_JOBS_PER_USER" in err.value.error
    assert not real_chats(standin)
    studio.jobs.give_back("address:127.0.0.1")
    assert ollama.Client(host=gateway.url).chat(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert studio.jobs.snapshot()["total"] == 0


def test_with_preemption_a_chat_pauses_the_render_like_a_chat_tab_message(standin, tmp_path):
    """CLAIR_PREEMPT=auto (the default): an API chat that does not fit beside a render pauses it at a step
    boundary, as a Chat-tab message does, instead of waiting for the whole render."""
    from clair.engines.image import RenderParams

    studio = make_studio(standin, tmp_path, preempt="auto", render_slice_s=0.0)
    served = Served(gateway_app(studio))
    stepping = threading.Event()
    result: dict = {}

    def slow(text, frac):
        if text.startswith("Step"):
            stepping.set()
            time.sleep(0.15)

    t = threading.Thread(target=lambda: result.update(info=studio.render(RenderParams("p", steps=20, width=64, height=64), slow)[1]))
    t.start()
    try:
        assert stepping.wait(30)
        reply = ollama.Client(host=served.url).chat(model=MODEL, messages=[{"role": "user", "content": "now"}])
        answered = time.time()
        assert reply.message.content == "You said: now"
        t.join(60)
    finally:
        served.stop()
    assert result["info"]["preemptions"] >= 1
    assert answered < result["info"]["gpu_finished_at"]  # it did not wait for the whole render
    (sent,) = real_chats(standin)
    assert sent.arrived > result["info"]["gpu_started_at"]


def test_a_bug_reaches_an_ollama_client_as_an_error_id(gateway, standin, studio, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(studio, "request_for", broken)
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=gateway.url).chat(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 500 and "error id" in err.value.error and "secret" not in err.value.error
    assert studio.jobs.snapshot()["total"] == 0
    assert ollama.Client(host=gateway.url).list().models  # still serving


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/../api/pull",
        "/v1/%2e%2e/api/pull",
        "/v1/..%2fapi%2fcreate",
        "/v1/models/../../api/copy",
        "/v1/./chat/completions",
        "/v1//api/push",
        "/v1/files",
    ],
)
def test_v1_on_the_ollama_port_forwards_its_own_endpoints_only(gateway, standin, raw_path):
    """Ollama's /v1 on Clair's Ollama port forwards /v1/models, chat, completions and embeddings: no other path,
    and no path whose `..` would lead elsewhere (httpx resolves `/v1/../api/pull` to Ollama's model management,
    which the port refuses by name). Sent as raw bytes, so no client tidies the path first."""
    import socket

    host, port = gateway.url.removeprefix("http://").split(":")
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": "hi"}'
    for method in ("POST", "GET"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                f"{method} {raw_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        status = int(reply.split(b" ", 2)[1])
        assert status in (404, 405), (method, raw_path, reply[:300])
    for path in ("/api/pull", "/api/create", "/api/copy", "/api/push", "/api/generate"):
        assert not standin.requests_to(path), path


def _send_raw(port: int, path: str, body: dict):
    """A socket that has sent one POST and reads nothing: the client that will hang up."""
    import json
    import socket

    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw
    )
    return s


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_client_that_hangs_up_before_ollamas_first_byte_frees_its_count_and_lease_at_once(standin, studio, path):
    """Ollama may take many seconds to answer (a model loading): a client that hangs up meanwhile must not keep
    its per-person count, its job slot and its GPU lease until Ollama's first byte (it did: 18-21 s in an
    attack). Its request to Ollama is closed too, and the port goes on serving."""
    from clair.adapters.gateway import Gateway
    from clair.edge.users import Users
    from clair.edge.web import Web

    web = Web(studio.cfg, Users(studio.cfg.users_path))
    served = Served(Gateway(studio, web).app())
    gate = standin.hold(MODEL)  # Ollama has the model but sends nothing until released
    try:
        s = _send_raw(served.port, path, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        gate.wait_reached(10)
        assert web.in_flight.count and studio.jobs.snapshot()["total"] == 1 and studio.arbiter.status()["holders"]
        s.close()
        standin.wait_until(
            lambda: not web.in_flight.count and studio.jobs.snapshot()["total"] == 0 and studio.arbiter.is_idle(),
            timeout=5,
        )
        assert not [r for r in standin.requests_to(path) if r.finished is not None]  # still held by the gate
    finally:
        gate.release()
    try:
        # Clair had closed its request: the stand-in's streamed reply, once released, meets a closed connection
        # (a one-piece JSON answer fits in the socket's buffer, so only a stream shows it).
        (first,) = standin.wait_until(lambda: [r for r in standin.requests_to(path) if r.finished is not None], timeout=10)
        assert first.aborted or path != "/api/chat"
        reply = ollama.Client(host=served.url).chat(model=MODEL, messages=[{"role": "user", "content": "next"}])
        assert reply.message.content == "You said: next"
    finally:
        served.stop()
