"""Fair limits: every limit refused with a clear message before any GPU work, and the caps on GPU jobs.

The unit tests drive `clair.service.limits`, `RenderParams.validated` and `Studio.check_fits` directly; the slow
ones start `python app.py` against the Ollama stand-in and check, from Ollama's side, that a refused request
caused no chat and no unload, and that one client past its cap does not hold up another.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from clair.base.config import Config
from clair.base.errors import BadRequest, GpuBusy
from clair.engines.image import RenderParams
from clair.service.limits import JobCounter, check_chat, plain_history
from tests.ollama_standin import OllamaStandin
from tests.support import App, Raw, wait_until
from tests.test_attack import histories

MODEL = "llama3.1:8b"
CFG = dataclasses.replace(
    Config(),
    max_prompt_chars=50,
    max_message_chars=40,
    max_history_messages=4,
    max_history_chars=100,
    max_side=512,
    max_steps=10,
    min_guidance=1.0,
    max_guidance=9.0,
    max_seed=1000,
)
LIMIT_ENV = {
    "CLAIR_MAX_PROMPT_CHARS": "50",
    "CLAIR_MAX_MESSAGE_CHARS": "40",
    "CLAIR_MAX_HISTORY_MESSAGES": "4",
    "CLAIR_MAX_HISTORY_CHARS": "100",
    "CLAIR_MAX_SIDE": "512",
    "CLAIR_MAX_STEPS": "10",
    "CLAIR_MIN_GUIDANCE": "1",
    "CLAIR_MAX_GUIDANCE": "9",
    "CLAIR_MAX_SEED": "1000",
}


# -- chat history: plain text only -------------------------------------------------------------------
def test_history_is_rebuilt_as_fresh_plain_text():
    sent = [
        {"role": "user", "content": "hi", "metadata": None, "options": None},
        {"role": "assistant", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
        {"role": "user", "content": [{"text": "bare block"}]},
        {"role": "assistant", "content": "   "},  # empty: dropped
    ]
    out = plain_history(sent, CFG)
    assert out == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bare block"},
    ]
    assert all(type(m["content"]) is str and set(m) == {"role", "content"} for m in out)
    assert all(m is not s for m, s in zip(out, sent, strict=False))


@pytest.mark.parametrize("history", histories("/etc/passwd"))
def test_a_history_holding_a_file_or_component_is_refused(history):
    with pytest.raises(BadRequest, match="text only"):
        plain_history(history, CFG)


@pytest.mark.parametrize(
    "history",
    [
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": True}],
        [{"role": "user", "content": [["nested"]]}],
        [{"role": "user", "content": [{"type": "text", "text": "x", "extra": {"path": "/etc/passwd"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": {"path": "/etc/passwd"}}]}],
    ],
)
def test_non_text_content_of_any_kind_is_refused(history):
    with pytest.raises(BadRequest, match="text only"):
        plain_history(history, CFG)


@pytest.mark.parametrize(
    ("history", "needle"),
    [
        ("not a list", "list of"),
        ([["user", "hi"]], "{role, content}"),
        ([{"role": "wizard", "content": "x"}], "role of system, user or assistant"),
        ([{"role": "user", "content": "x"}] * 5, "CLAIR_MAX_HISTORY_MESSAGES"),
        ([{"role": "user", "content": "x" * 60}] * 2, "CLAIR_MAX_HISTORY_CHARS"),
    ],
)
def test_history_limits_say_what_to_do(history, needle):
    with pytest.raises(BadRequest) as err:
        plain_history(history, CFG)
    assert needle in str(err.value)


def test_message_and_system_prompt_limits():
    assert check_chat(CFG, "hi", [], "be brief", "llama3.1:8b")[0] == "hi"
    with pytest.raises(BadRequest, match=r"message is too long.*41 characters.*40.*CLAIR_MAX_MESSAGE_CHARS"):
        check_chat(CFG, "x" * 41, [])
    with pytest.raises(BadRequest, match="system prompt is too long"):
        check_chat(CFG, "hi", [], "s" * 41)
    with pytest.raises(BadRequest, match="must be text"):
        check_chat(CFG, {"path": "/etc/passwd"}, [])
    with pytest.raises(BadRequest, match="model name"):
        check_chat(CFG, "hi", [], None, "x\ny")
    with pytest.raises(BadRequest, match="model name"):
        check_chat(CFG, "hi", [], None, "m" * 201)
    assert check_chat(CFG, "hi", [], None, "tiny (random weights)")[3] == "tiny (random weights)"
    with pytest.raises(BadRequest, match="Type a message"):
        check_chat(CFG, "  ", [])


# -- render parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"prompt": "p" * 51}, "CLAIR_MAX_PROMPT_CHARS"),
        ({"negative_prompt": "n" * 51}, "negative prompt is too long"),
        ({"width": 520}, "from 64 to 512"),
        ({"height": 1024}, "CLAIR_MAX_SIDE"),
        ({"steps": 11}, "from 1 to 10"),
        ({"steps": 2.5}, "whole number"),
        ({"guidance": 0.5}, "from 1 to 9"),
        ({"guidance": 9.5}, "CLAIR_MAX_GUIDANCE"),
        ({"seed": 1001}, "from 0 to 1000"),
        ({"seed": float("nan")}, "finite"),
        ({"width": {"path": "/etc/passwd"}}, "width must be a number"),
        ({"prompt": ["a"]}, "prompt must be text"),
    ],
)
def test_render_limits_are_settings(change, needle):
    base = {"prompt": "a cat", "steps": 4, "guidance": 5.0, "width": 256, "height": 256, "seed": 3}
    with pytest.raises(BadRequest) as err:
        RenderParams(**(base | change)).validated(CFG)
    assert needle in str(err.value)
    ok = RenderParams(**base).validated(CFG)
    assert (ok.width, ok.steps, ok.seed) == (256, 4, 3)
    assert 0 <= RenderParams("a", steps=4, width=64, height=64, seed=-1).validated(CFG).seed <= 1000
    edge = RenderParams("a", "n" * 50, 10, 9.0, 512, 64, 1000).validated(CFG)
    assert (edge.steps, edge.width, edge.seed) == (10, 512, 1000)


def test_a_render_that_can_never_fit_is_refused_with_the_largest_size_that_fits():
    from clair.service.studio import Studio

    studio = Studio(dataclasses.replace(Config(), vram_budget_gb=8.0, output_dir="/nonexistent-never-written"))
    budget = studio.arbiter.budget
    params = RenderParams("a", width=1024, height=768).validated()
    with pytest.raises(BadRequest) as err:
        studio.check_fits(params)
    text = str(err.value)
    assert "1024x768" in text and "budget of 8.0 GB" in text
    w, h = (int(x) for x in text.rsplit("fits is ", 1)[1].rstrip(".").split("x"))
    assert w % 8 == 0 and h % 8 == 0 and w > h  # same shape
    assert studio.image.footprint(w, h)[0] <= budget < studio.image.footprint(w + 16, h + 16)[0]
    studio.check_fits(RenderParams("a", width=w, height=h).validated())  # the suggestion is accepted
    # An unknown budget (0) refuses nothing on size.
    Studio(Config(output_dir="/nonexistent-never-written")).check_fits(RenderParams("a", width=2048, height=2048))


# -- the job counter -------------------------------------------------------------------------------------
class CounterMachine(RuleBasedStateMachine):
    """Random takes and give-backs by a few clients: the caps hold after every step."""

    def __init__(self):
        super().__init__()
        self.c = JobCounter(max_per_user=2, max_total=3, eta_s=lambda: 12.3)
        self.held: dict[str, int] = {}

    @rule(who=st.sampled_from(["a", "b", "c"]))
    def take(self, who):
        before = sum(self.held.values())
        why = self.c.try_take(who)
        if self.held.get(who, 0) >= 2:
            assert why == "user"
        elif before >= 3:
            assert why == "house"
        else:
            assert why is None
            self.held[who] = self.held.get(who, 0) + 1

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def give_back(self, data):
        who = data.draw(st.sampled_from(sorted(w for w, n in self.held.items() if n)))
        self.c.give_back(who)
        self.held[who] -= 1

    @rule(who=st.sampled_from(["a", "b", "c"]))
    def give_back_unheld_is_harmless(self, who):
        if not self.held.get(who):
            self.c.give_back(who)

    @invariant()
    def caps_hold(self):
        snap = self.c.snapshot()
        assert snap["total"] == sum(snap["per_user"].values()) == sum(self.held.values()) <= 3
        assert all(1 <= n <= 2 for n in snap["per_user"].values())
        assert snap["per_user"] == {w: n for w, n in self.held.items() if n}


TestCounterMachine = CounterMachine.TestCase
TestCounterMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_slot_is_given_back_on_any_exit_and_busy_says_when_to_retry():
    c = JobCounter(max_per_user=1, max_total=5, eta_s=lambda: 41.6)
    with pytest.raises(ValueError), c.slot("a"):
        raise ValueError("boom")
    with c.slot("a"):
        busy = r"Busy: you already have 1 .*CLAIR_MAX_JOBS_PER_USER.*about 42 s"
        with pytest.raises(GpuBusy, match=busy), c.slot("a"):
            pass
        with c.slot("b"):
            pass
    assert c.snapshot() == {"total": 0, "per_user": {}, "refused": 1}


def test_the_caps_hold_under_threads():
    c = JobCounter(max_per_user=2, max_total=5)
    now, peak, lock = {}, {"total": 0, "user": 0}, threading.Lock()

    def job(who):
        try:
            with c.slot(who):
                with lock:
                    now[who] = now.get(who, 0) + 1
                    peak["total"] = max(peak["total"], sum(now.values()))
                    peak["user"] = max(peak["user"], now[who])
                time.sleep(0.002)
                with lock:
                    now[who] -= 1
        except GpuBusy:
            pass

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(job, [f"u{i % 4}" for i in range(400)]))
    assert peak["total"] <= 5 and peak["user"] <= 2 and peak["total"] >= 2
    assert c.snapshot()["total"] == 0


# -- through the app ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def standin():
    s = OllamaStandin({MODEL: 4.9}, load_delay=0.05, unload_delay=0.05, token_delay=0.02)
    s.start()
    yield s
    s.stop()


def _gpu_traffic(standin):
    """Every request that would put work on the GPU: chats, loads and unloads (keep_alive 0)."""
    return standin.requests_to("/api/chat") + standin.requests_to("/api/generate")


@pytest.mark.slow
def test_each_limit_is_refused_clearly_before_any_gpu_work(standin, tmp_path):
    app = App(
        tmp_path,
        {
            "OLLAMA_HOST": standin.host,
            "CLAIR_CHAT_BACKEND": "ollama",
            "CLAIR_VRAM_BUDGET_GB": "8",
            "CLAIR_VAE": "stock",  # the largest size that fits below follows the stock VAE's prior
            "CLAIR_PRELOAD": "0",
            "CLAIR_WARMUP": "0",
            **LIMIT_ENV,
        },
    )
    try:
        assert app.client.predict("warm up", [], api_name="/chat") == "You said: warm up"
        assert standin.loaded() == [MODEL]
        grants = app.status()["stats"]["grants"]
        standin.reset_logs()
        ui = Raw(app.url)
        hist = [{"role": "user", "content": "hi"}]
        api_chats = [
            (("x" * 41, []), "CLAIR_MAX_MESSAGE_CHARS"),
            (("hi", hist * 5), "CLAIR_MAX_HISTORY_MESSAGES"),
            (("hi", [{"role": "user", "content": "y" * 101}]), "CLAIR_MAX_HISTORY_CHARS"),
            (("hi", [{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd"}}]}]), "text only"),
        ]
        for args, needle in api_chats:
            with pytest.raises(Exception, match=needle):
                app.client.predict(*args, api_name="/chat")
        shown = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]  # the Chatbot's wire format
        ui_chats = [
            (["x" * 41, [], MODEL, ""], "CLAIR_MAX_MESSAGE_CHARS"),
            (["hi", shown * 5, MODEL, ""], "CLAIR_MAX_HISTORY_MESSAGES"),
            (["hi", [{"role": "user", "content": [{"type": "text", "text": "y" * 101}]}], MODEL, ""], "HISTORY_CHARS"),
            (["hi", [], MODEL, "s" * 41], "system prompt is too long"),
        ]
        for data, needle in ui_chats:
            r = ui.call("chat_ui", data)
            assert not r["ok"] and needle in r["error"], r
        renders = [
            ({"prompt": "p" * 51}, "CLAIR_MAX_PROMPT_CHARS"),
            ({"negative_prompt": "n" * 51}, "CLAIR_MAX_PROMPT_CHARS"),
            ({"width": 520}, "from 64 to 512"),
            ({"height": 8}, "from 64 to 512"),
            ({"steps": 11}, "from 1 to 10"),
            ({"guidance": 0.5}, "from 1 to 9"),
            ({"guidance": 9.5}, "from 1 to 9"),
            ({"seed": 1001}, "from 0 to 1000"),
            ({"seed": -2}, "from 0 to 1000"),
            ({"width": 512, "height": 512}, "largest render of that shape that fits is 336x336"),
        ]
        for change, needle in renders:
            with pytest.raises(Exception, match=needle):
                app.render(**change)
        r = ui.call("render", ["a cat", "", 2, 5.0, 4096, 64, 1])  # what the browser gets: HTTP 422 at once
        assert r["status"] == 422 and "CLAIR_MAX_SIDE" in r["error"], r
        # Nothing reached Ollama, nothing was unloaded, no lease was granted.
        assert _gpu_traffic(standin) == []
        assert standin.loaded() == [MODEL]
        assert not [e for e in standin.events_for(MODEL) if e.kind.startswith("unload")]
        st = app.status()
        assert st["stats"]["grants"] == grants and st["jobs"]["total"] == 0
        # The server keeps serving.
        assert app.client.predict("still there?", [], api_name="/chat") == "You said: still there?"
    finally:
        app.stop()


@pytest.mark.slow
def test_a_client_past_its_cap_is_refused_while_another_clients_chat_gets_through(standin, tmp_path):
    app = App(
        tmp_path,
        {
            "OLLAMA_HOST": standin.host,
            "CLAIR_CHAT_BACKEND": "ollama",
            "CLAIR_MAX_JOBS_PER_USER": "2",
            "CLAIR_MAX_QUEUE": "3",
            "CLAIR_PREEMPT": "off",  # chats wait for renders here: with preemption they would pause them
            "CLAIR_PRELOAD": "0",
            "CLAIR_WARMUP": "0",
        },
    )
    try:
        app.render()  # the tiny pipeline is loaded: later renders take a predictable time
        greedy, other, third = Raw(app.url, "127.0.0.1"), Raw(app.url, "127.0.0.2"), Raw(app.url, "127.0.0.3")
        slow = ["a slow one", "", 20, 5.0, 1024, 1024, 1]  # several seconds on the tiny model
        pool = ThreadPoolExecutor(12)
        first = pool.submit(greedy.call, "render", slow)
        wait_until(lambda: (app.status()["holder"] or {}).get("kind") == "render", timeout=30)
        second = pool.submit(greedy.call, "render", slow)
        wait_until(lambda: app.status()["jobs"]["total"] == 2, timeout=10)
        # The greedy client queues 30 more: each is refused at once, with a retry time.
        t0 = time.monotonic()
        refused = list(pool.map(lambda _: greedy.call("render", slow), range(30)))
        assert time.monotonic() - t0 < 10
        # Chats count too, through the UI (refused when queued) and the API (refused in the handler).
        refused += [greedy.call("chat_ui", ["hi", [], MODEL, ""]), greedy.call("chat", ["hi", []])]
        for r in refused:
            assert not r["ok"]
            assert "Busy: you already have 2" in r["error"] and "Try again in about" in r["error"], r
        assert refused[-2]["status"] == 422 and refused[-1]["status"] == 200  # see docs/design.md
        # Another client still gets a chat through, while the greedy one's renders are not all done.
        chat = other.call("chat", ["are you there?", []])
        assert chat["ok"] and chat["data"] == ["You said: are you there?"], chat
        assert not second.done(), "the greedy client's second render finished first: the test proves nothing"
        # The house cap (3): while the greedy client's second render runs, a third client takes two slots
        # (quick renders, held behind it), and then even a client with none of its own is refused.
        wait_until(lambda: app.status()["jobs"]["total"] == 1, timeout=30)
        quick = ["quick", "", 2, 5.0, 64, 64, 2]
        held = [pool.submit(third.call, "render", quick) for _ in range(2)]
        wait_until(lambda: app.status()["jobs"]["total"] == 3, timeout=10)
        full = other.call("chat", ["me too", []])
        assert not full["ok"] and "3 requests are already waiting or running" in full["error"], full
        assert not second.done()
        for f in (first, second, *held):
            assert f.result(timeout=300)["ok"]
        # Every slot was given back.
        wait_until(lambda: app.status()["jobs"]["total"] == 0, timeout=10)
        assert other.call("chat", ["after", []])["ok"]
        # A client that goes away while its chat waits for the GPU gives its slot back too.
        last = pool.submit(greedy.call, "render", slow)
        wait_until(lambda: (app.status()["holder"] or {}).get("kind") == "render", timeout=30)
        gone = Raw(app.url, "127.0.0.4")
        gone.http.timeout = httpx.Timeout(1.0)  # gives up while the chat waits for the render
        with pytest.raises(httpx.ReadTimeout):
            gone.call("chat", ["anyone?", []])
        assert app.status()["jobs"]["total"] == 2
        assert last.result(timeout=120)["ok"]
        wait_until(lambda: app.status()["jobs"]["total"] == 0, timeout=30)
        pool.shutdown()
    finally:
        app.stop()


# -- each user's gallery ---------------------------------------------------------------------------------
def test_the_gallery_lists_an_owners_own_images_from_the_servers_listing(tmp_path):
    import os

    from PIL import Image

    from clair.engines.image import ImageEngine, read_metadata

    out = tmp_path / "outputs"
    engine = ImageEngine(dataclasses.replace(Config(), output_dir=str(out)))
    img = Image.new("RGB", (8, 8))
    made = {}
    for i, owner in enumerate(["ann", "bob", None, "ann"]):
        p = engine.save(img, RenderParams(f"picture {i}", seed=i), owner=owner)
        os.utime(p, (1000 + i, 1000 + i))
        made[i] = p
    assert read_metadata(made[0])["owner"] == "ann" and "owner" not in read_metadata(made[2])
    assert re.search(r"-picture-0-[0-9a-f]{12}\.png$", made[0].name)  # not guessable by another user
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    (out / "zz-link.png").symlink_to(secret)  # a link out of the folder is never listed
    assert engine.recent(10, owner="ann") == [made[3], made[0]]
    assert engine.recent(10, owner="bob") == [made[1]]
    assert engine.recent(10) == [made[3], made[2], made[1], made[0]]
    assert engine.recent(1, owner="ann") == [made[3]]
    assert engine.recent(10, owner="carol") == []


def test_the_retry_estimate_counts_what_runs_and_what_waits():
    from clair.arbiter import Arbiter

    a = Arbiter(policy="exclusive", budget_bytes=20 * 2**30)
    a.add_tenant("image", lambda: None)
    a.add_tenant("ollama", lambda: None)
    assert a.drain_eta_s() == 0.0
    running = a.request("render", "image", 2**30).wait(5)
    waiting = [a.request("render", "image", 2**30), a.request("chat", "ollama", 2**30)]
    eta = a.drain_eta_s()
    # A render just started (~15 s typical) and one render and one chat waiting (15 s + 5 s).
    assert 30 <= eta <= 35
    c = JobCounter(1, 1, eta_s=a.drain_eta_s)
    assert "about 3" in c.busy_message("house")
    for lease in (running, *waiting):
        lease.release()
    assert a.drain_eta_s() == 0.0


def test_who_is_asking_is_the_user_else_the_address():
    import gradio as gr
    from starlette.requests import Request

    from clair.adapters.ui import client_id, owner_of

    def req(username=None, host="192.168.1.20"):
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "client": (host, 5555)}
        return gr.Request(Request(scope), username=username)

    assert client_id(req("ann")) == "user:ann" and owner_of(req("ann")) == "ann"
    assert client_id(req()) == "address:192.168.1.20" and owner_of(req()) is None
    assert client_id(req(host="192.168.1.21")) != client_id(req())
    assert client_id(None) == "local" and owner_of(None) is None


# -- errors: Clair's own messages, with an id ------------------------------------------------------------
def test_an_unexpected_error_reaches_the_client_as_an_id_and_the_log_has_the_details(tmp_path, caplog):
    import gradio as gr

    from clair.adapters.ui import build
    from clair.service.studio import Studio

    studio = Studio(dataclasses.replace(Config(), output_dir=str(tmp_path / "out")))
    demo = build(studio)
    fns = {f.name: f.fn for f in demo.fns.values()}

    def broken(*a, **k):
        raise RuntimeError("/etc/clair/clair.env: internal detail")

    studio.status = broken  # type: ignore[method-assign]
    studio.chat_backend = broken  # type: ignore[method-assign]
    for name in ("status", "status_line", "chat_notice"):
        with pytest.raises(gr.Error) as err:
            fns[name]()
        text = str(err.value)
        eid = re.search(r"error id ([0-9a-f]{6})", text).group(1)
        assert "internal detail" not in text and "RuntimeError" not in text
        logged = [r for r in caplog.records if eid in r.getMessage()]
        assert logged and "internal detail" in str(logged[0].exc_info[1])


# -- whatever a client sends: a clear refusal or clean values, never a crash ------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "wizard"]) | JSON},
    optional={
        "content": JSON
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}), max_size=3),
        "metadata": JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(history=st.lists(MESSAGE, max_size=6) | JSON, message=JSON, system=JSON, model=JSON)
def test_any_chat_request_is_refused_clearly_or_comes_out_as_plain_text(history, message, system, model):
    try:
        msg, past, sys_, mdl = check_chat(CFG, message, history, system, model)
    except BadRequest as exc:
        assert str(exc)
        return
    assert type(msg) is str and (sys_ is None or type(sys_) is str) and (mdl is None or type(mdl) is str)
    for m in past:
        assert set(m) == {"role", "content"} and m["role"] in ("user", "assistant", "system")
        assert type(m["content"]) is str and m["content"].strip()


@settings(max_examples=300, deadline=None)
@given(values=st.lists(JSON | st.integers(-5, 600) | st.floats(-5, 40), min_size=7, max_size=7))
def test_any_render_request_is_refused_clearly_or_comes_out_checked(values):
    try:
        p = RenderParams(*values).validated(CFG)
    except BadRequest as exc:
        assert str(exc)
        return
    assert type(p.prompt) is str and 0 < len(p.prompt) <= 50 and type(p.negative_prompt) is str
    assert type(p.steps) is int and 1 <= p.steps <= 10 and type(p.seed) is int and 0 <= p.seed <= 1000
    assert type(p.width) is int and 64 <= p.width <= 512 and p.width % 8 == 0
    assert type(p.guidance) is float and 1 <= p.guidance <= 9
