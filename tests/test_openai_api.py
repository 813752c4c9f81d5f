"""Clair's /v1 (clair/adapters/openai_api.py) driven by the official `openai` client, behind the same guard as on
Clair's web port (clair/edge/web.py), Ollama played by the stand-in. In-process: no Gradio is needed here; the
whole app is covered by tests/test_gateway_app.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from clair.edge.keys import Keys, keys_path
from clair.edge.users import Users
from tests.gateway_support import Served, hold_render, make_studio, v1_app
from tests.ollama_standin import OllamaStandin
from tests.support import wait_until

MODEL = "llama3.1:8b"


@pytest.fixture
def standin():
    s = OllamaStandin({MODEL: 4.9}, unload_delay=0.1, token_delay=0.01).start()
    yield s
    s.stop()


@pytest.fixture
def studio(standin, tmp_path):
    return make_studio(standin, tmp_path, preempt="off")


@pytest.fixture
def v1(studio):
    served = Served(v1_app(studio))
    yield served
    served.stop()


def client(served, key="no key needed on loopback", **kw) -> openai.OpenAI:
    kw.setdefault("timeout", 60)
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, **kw)


def test_models_lists_the_chat_and_image_models_apart(v1, studio):
    models = client(v1).models.list().data
    assert [(m.id, m.owned_by) for m in models] == [(MODEL, "ollama"), ("sdxl:" + studio.image.model_id, "clair-image")]


def test_a_chat_with_the_image_model_is_refused_with_what_to_pick(v1, standin):
    image_id = [m.id for m in client(v1).models.list()][-1]
    with pytest.raises(openai.BadRequestError) as err:
        client(v1).chat.completions.create(model=image_id, messages=[{"role": "user", "content": "hi"}])
    assert "is Clair's image model" in str(err.value) and "/v1/models" in str(err.value)
    assert not [r for r in standin.requests_to("/api/chat") if r.messages]  # nothing reached the chat engine


def test_chat_streams_through_the_arbiter(v1, standin, studio):
    stream = client(v1).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ],
        stream=True,
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "You said: hi there"
    assert len([c for c in chunks if c.choices[0].delta.content]) >= 3  # streamed, not one block
    assert chunks[-1].choices[0].finish_reason == "stop"
    (sent,) = [r for r in standin.requests_to("/api/chat") if r.messages]
    assert sent.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "hi there"},
    ]
    assert sent.options["num_ctx"] == studio.cfg.chat_num_ctx
    assert studio.arbiter.stats["grants"] >= 1
    standin.wait_until(studio.arbiter.is_idle)


def test_chat_not_streaming_and_bad_requests(v1, standin):
    c = client(v1)
    done = c.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "terse"}, {"role": "user", "content": "one"}]
    )
    assert done.choices[0].message.content == "You said: one" and done.object == "chat.completion"
    (sent,) = [r for r in standin.requests_to("/api/chat") if r.messages]
    assert sent.messages == [{"role": "system", "content": "terse"}, {"role": "user", "content": "one"}]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    assert "Each tool must be" in err.value.body["message"]
    bad_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "not json"}}
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "assistant", "tool_calls": [bad_call]}, {"role": "tool", "content": "42", "tool_call_id": "c1"}],
        )
    assert "arguments" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hm"}])
    assert "last message" in err.value.body["message"]
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503 and "not installed" in err.value.body["message"]


def test_a_chat_during_a_render_waits_for_it(v1, standin, studio):
    _, leave, render, result = hold_render(studio)
    got: dict = {}

    def chat():
        stream = client(v1).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "held?"}], stream=True
        )
        got["text"] = "".join(c.choices[0].delta.content or "" for c in stream)

    t = threading.Thread(target=chat)
    t.start()
    try:
        waiting = standin.wait_until(lambda: studio.arbiter.status()["waiting"], timeout=10)
        assert waiting[0]["label"] == f"api:{MODEL} (127.0.0.1)"
        time.sleep(0.3)
        assert not [r for r in standin.requests_to("/api/chat") if r.messages]
    finally:
        leave.set()
    render.join(30)
    t.join(30)
    assert got["text"] == "You said: held?"
    (sent,) = [r for r in standin.requests_to("/api/chat") if r.messages]
    # Held until the render's tail (its denoising done, only the decode left: the chat fits beside it) or end.
    assert sent.arrived >= (result["info"]["tail_at"] or result["info"]["gpu_finished_at"])


def test_image_generation_returns_a_png_with_its_parameters(v1, studio):
    c = client(v1)
    resp = c.images.generate(
        prompt="a lighthouse at dusk",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 7, "negative_prompt": "fog", "guidance": 4.5},
    )
    png = base64.b64decode(resp.data[0].b64_json)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (64, 64)
    meta = json.loads(img.text["clair"])
    assert {k: v for k, v in meta.items() if k not in ("model", "vae", "owner")} | {"model": "tiny"} == {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "fog",
        "steps": 2,
        "guidance": 4.5,
        "width": 64,
        "height": 64,
        "seed": 7,
        "model": "tiny",
    }
    assert "Seed: 7" in img.text["parameters"]

    # As a URL: served from the output folder, the same file.
    resp = c.images.generate(prompt="a lighthouse at dusk", size="64x64", extra_body={"steps": 2, "seed": 8})
    url = resp.data[0].url
    assert url.startswith(v1.url + "/v1/files/") and url.endswith(".png")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert json.loads(Image.open(io.BytesIO(got.content)).text["clair"])["seed"] == 8
    saved = sorted(p.name for p in studio.image.output_dir.glob("*.png"))
    assert len(saved) == 2 and url.rsplit("/", 1)[1] in saved


def test_files_route_serves_only_output_pngs_by_exact_name(v1, studio, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"not yours")
    studio.image.output_dir.mkdir(parents=True, exist_ok=True)
    (studio.image.output_dir / "link.png").symlink_to(tmp_path / "secret.png")
    (studio.image.output_dir / "notes.txt").write_text("x")
    for name in ("../secret.png", "..%2Fsecret.png", "link.png", "notes.txt", "nope.png", "%2e%2e"):
        assert httpx.get(v1.url + "/v1/files/" + name).status_code == 404, name


def test_bad_image_requests_are_refused_before_the_gpu(v1, studio):
    c = client(v1)
    for kw in (
        {"size": "100x100"},  # not a multiple of 8
        {"size": "big"},
        {"n": 9},
        {"extra_body": {"steps": 0}},
        {"extra_body": {"seed": "seven"}},
    ):
        with pytest.raises(openai.BadRequestError):
            c.images.generate(prompt="x", **kw)
    import httpx  # the official client refuses to send NaN; other clients (and Python's json) do

    for raw in (b'{"prompt": "x", "steps": NaN}', b'{"prompt": "x", "seed": Infinity}'):
        r = httpx.post(str(c.base_url) + "images/generations", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    assert studio.arbiter.stats["grants"] == 0


@pytest.fixture
def lan(standin, tmp_path):
    """Clair as it serves the LAN: every interface, with a user and a key (tested on loopback)."""
    studio = make_studio(standin, tmp_path, host="0.0.0.0", preempt="off")
    Users(studio.cfg.users_path).set_password("alice", "correct horse battery")
    key, _ = Keys(keys_path(studio.cfg.users_path), Users(studio.cfg.users_path)).add("alice")
    served = Served(v1_app(studio))
    yield served, key, studio
    served.stop()


def test_on_a_lan_a_key_is_needed_and_wrong_ones_are_refused(lan):
    served, key, _ = lan
    # No key at all (the openai client always sends one, so plain HTTP here): refused, and says what to do.
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert "addkey" in r.json()["error"]["message"]
    for bad in ("clair-wrong", key[:-1], key + "x", "Bearer " + key):
        with pytest.raises(openai.AuthenticationError) as err:
            client(served, bad).models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    # The back-off after failures (shared with logins) says 429, OpenAI-shaped.
    with pytest.raises(openai.RateLimitError) as err:
        client(served, "clair-wrong-again").models.list()
    assert "try again in" in err.value.body["message"]
    # A browser session cookie opens nothing here either.
    r = httpx.get(served.url + "/v1/models", cookies={"access-token-": "x"})
    assert r.status_code in (401, 429)


def test_on_a_lan_the_right_key_works_and_names_the_user(lan):
    served, key, studio = lan
    c = client(served, key)
    assert MODEL in [m.id for m in c.models.list()]
    _, leave, render, _ = hold_render(studio)
    t = threading.Thread(target=lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}]))
    t.start()
    try:
        labels = wait_until(lambda: [w["label"] for w in studio.arbiter.status()["waiting"]], timeout=10)
        assert labels == [f"api:{MODEL} (alice@127.0.0.1)"]
    finally:
        leave.set()
        render.join(30)
        t.join(30)


def test_foreign_origin_browser_requests_are_refused(lan):
    served, key, _ = lan
    c = client(served, key, default_headers={"Origin": "http://evil.example"})
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_a_client_that_gives_up_while_held_leaves_the_queue(v1, standin, studio):
    _, leave, render, _ = hold_render(studio)
    try:
        for stream in (False, True):
            impatient = client(v1, timeout=1.0)
            with pytest.raises(openai.APITimeoutError):
                list(impatient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "bye"}], stream=stream))
            standin.wait_until(lambda: not studio.arbiter.status()["waiting"], timeout=5)
    finally:
        leave.set()
        render.join(30)
    standin.wait_until(studio.arbiter.is_idle)
    assert not [r for r in standin.requests_to("/api/chat") if r.messages]


def test_chat_with_the_in_process_model_ignores_openais_model_names(standin, tmp_path):
    """Demo mode or no Ollama: the in-process model answers whatever model a client names."""
    studio = make_studio(standin, tmp_path, chat_backend="local", local_chat_model="tiny")
    served = Served(v1_app(studio))
    try:
        c = client(served)
        assert next(m.id for m in c.models.list()) == studio.local.label
        stream = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "stop" and {c.model for c in chunks} == {studio.local.label}
        assert studio.arbiter.stats["grants"] == 1 and not standin.requests_to("/api/chat")
    finally:
        served.stop()


def test_api_requests_count_against_the_per_user_caps(lan):
    """CLAIR_MAX_JOBS_PER_USER: a key's requests count as its user's, in the counter the UI uses."""
    from clair.service.limits import JobCounter

    served, key, studio = lan
    studio.jobs = JobCounter(max_per_user=1, max_total=16)
    c = client(served, key)
    _, leave, render, _ = hold_render(studio)
    first = threading.Thread(target=lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "1"}]))
    first.start()
    try:
        wait_until(lambda: studio.arbiter.status()["waiting"], timeout=10)
        assert studio.jobs.snapshot()["per_user"] == {"user:alice": 1}
        with pytest.raises(openai.RateLimitError) as err:
            c.images.generate(prompt="x", size="64x64", extra_body={"steps": 1})
        assert "CLAIR_MAX_JOBS_PER_USER" in err.value.body["message"]
        # The UI's logged-in alice is the same person: her browser would be refused too.
        assert studio.jobs.would_refuse("user:alice") == "user"
    finally:
        leave.set()
        render.join(30)
        first.join(30)
    wait_until(lambda: studio.jobs.snapshot()["total"] == 0, timeout=5)
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2"}])  # free again


def test_an_image_url_serves_only_the_user_who_asked_for_it(lan):
    served, key, studio = lan
    from clair.edge.users import Users

    Users(studio.cfg.users_path).set_password("bob", "bobpass000")  # a key acts for an existing user
    other, _ = Keys(keys_path(studio.cfg.users_path), Users(studio.cfg.users_path)).add("bob")
    url = client(served, key).images.generate(prompt="mine", size="64x64", extra_body={"steps": 1}).data[0].url
    name = url.rsplit("/", 1)[1]
    assert (studio.image.output_dir / name).is_file()
    mine = httpx.get(url, headers={"Authorization": f"Bearer {key}"})
    assert mine.status_code == 200 and mine.content == (studio.image.output_dir / name).read_bytes()
    assert json.loads(Image.open(io.BytesIO(mine.content)).text["clair"])["owner"] == "alice"  # in her gallery
    assert [p.name for p in studio.image.recent(5, owner="alice")] == [name]
    assert httpx.get(url, headers={"Authorization": f"Bearer {other}"}).status_code == 404
    assert httpx.get(url).status_code == 401
    # An image saved by someone else (the Image tab) is not served under its exact name either.
    (studio.image.output_dir / "tab.png").write_bytes((studio.image.output_dir / name).read_bytes())
    assert httpx.get(served.url + "/v1/files/tab.png", headers={"Authorization": f"Bearer {key}"}).status_code == 404


def test_a_bug_reaches_the_client_as_an_error_id_and_the_server_goes_on(v1, studio, monkeypatch, caplog):
    def broken(*a, **kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(studio, "render_steps", broken)
    with pytest.raises(openai.InternalServerError) as err:
        client(v1).images.generate(prompt="x", size="64x64", response_format="b64_json", extra_body={"steps": 1})
    message = err.value.body["message"]
    assert "error id" in message and "secret" not in message
    assert "secret internals" in caplog.text  # the details are in the log
    assert MODEL in [m.id for m in client(v1).models.list()]  # still serving
    assert studio.jobs.snapshot()["total"] == 0  # the slot came back


def _ask(served, person: str, out: dict) -> None:
    out[person] = httpx.post(
        served.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-OpenWebUI-User-Id": person, "Authorization": "Bearer any"},
        timeout=60,
    )


@pytest.mark.parametrize("trusted", [True, False])
def test_people_behind_one_client_are_counted_apart_only_when_it_is_trusted_to_name_them(standin, tmp_path, trusted):
    """Open WebUI's users all arrive from one address (or with one key). With CLAIR_FORWARDED_USERS_FROM naming
    it, each person named by X-OpenWebUI-User-Id gets the per-person cap; without, the header is ignored and
    they share one. Either way the 429 says whose requests were counted."""
    studio = make_studio(
        standin, tmp_path, preempt="off", max_jobs_per_user=1, forwarded_users_from="127.0.0.1" if trusted else ""
    )
    served = Served(v1_app(studio))
    _, leave, render, _ = hold_render(studio)  # chats wait for the GPU, each holding its cap's slot
    answers: dict = {}
    waiting = []
    try:
        waiting.append(threading.Thread(target=_ask, args=(served, "alice-uuid", answers)))
        waiting[-1].start()
        wait_until(lambda: studio.jobs.snapshot()["total"] == 1)
        if trusted:  # bob is someone else: he waits too, and alice's second request is hers alone to refuse
            waiting.append(threading.Thread(target=_ask, args=(served, "bob-uuid", answers)))
            waiting[-1].start()
            wait_until(lambda: studio.jobs.snapshot()["total"] == 2)
            _ask(served, "alice-uuid", answers)
            refused = answers["alice-uuid"]
        else:  # one person for Clair: bob is refused for alice's request
            _ask(served, "bob-uuid", answers)
            refused = answers["bob-uuid"]
        assert refused.status_code == 429
        message = refused.json()["error"]["message"]
        assert "CLAIR_MAX_JOBS_PER_USER" in message and "Counted:" in message
        if trusted:
            assert "the one person (Open WebUI's X-OpenWebUI-User-Id) behind 127.0.0.1" in message
        else:
            assert "all of its people together" in message and "CLAIR_FORWARDED_USERS_FROM" in message
        assert "alice" not in message and "bob" not in message  # the client's strings are not handed back
    finally:
        leave.set()
        render.join(30)
        for t in waiting:
            t.join(60)
        served.stop()
    assert all(r.status_code == 200 for p, r in answers.items() if r is not refused), answers
    assert studio.jobs.snapshot()["total"] == 0


def test_an_open_webui_household_each_person_sending_a_message_is_not_refused(standin, tmp_path):
    """What Open WebUI does for one message: the reply, a title, tags and follow-ups, four chats at once. Three
    people at once while a render holds the GPU: twelve requests, each person within their own cap of four
    (CLAIR_MAX_JOBS_PER_USER's default), none refused, all answered once the render ends."""
    studio = make_studio(standin, tmp_path, preempt="off", forwarded_users_from="127.0.0.1")
    assert studio.cfg.max_jobs_per_user == 4
    served = Served(v1_app(studio))
    _, leave, render, _ = hold_render(studio)
    answers: list = []
    lock = threading.Lock()

    def ask(person: str) -> None:
        r = httpx.post(
            served.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": f"from {person}"}]},
            headers={"X-OpenWebUI-User-Id": person, "X-OpenWebUI-User-Name": person.title()},
            timeout=120,
        )
        with lock:
            answers.append((person, r.status_code, r.text[:300]))

    threads = [threading.Thread(target=ask, args=(p,)) for p in ("ann", "ben", "cy") for _ in range(4)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: studio.jobs.snapshot()["total"] == 12 or len(answers) > 0, timeout=30)
        assert not answers, answers  # nobody refused while they wait for the render
    finally:
        leave.set()
        render.join(30)
        for t in threads:
            t.join(120)
        served.stop()
    assert sorted(code for _, code, _ in answers) == [200] * 12, answers


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_usage_is_ollamas_own_count_whole_and_streamed(v1, standin):
    c = client(v1)
    done = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count these words"}])
    (sent,) = [r for r in standin.requests_to("/api/chat") if r.messages]
    prompt, reply = sent.counts  # what the stand-in's final line reported
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt, reply)
    assert done.usage.total_tokens == prompt + reply and reply > 0

    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "again"}], stream=True, stream_options={"include_usage": True}
        )
    )
    last = [r for r in standin.requests_to("/api/chat") if r.messages][-1]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == last.counts
    assert chunks[-2].choices[0].finish_reason == "stop"
    # Without include_usage, no usage chunk (as OpenAI).
    plain = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True))
    assert all(ch.choices and ch.usage is None for ch in plain)


@pytest.mark.parametrize("stream", [False, True])
def test_tools_reach_ollama_and_its_calls_come_back_in_openais_shape(v1, standin, studio, stream):
    c = client(v1)
    ask = [{"role": "user", "content": "Paris"}]
    if stream:
        chunks = list(c.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], stream=True))
        (delta,) = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
        (call,) = delta
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        done = c.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER])
        assert done.choices[0].finish_reason == "tool_calls" and not done.choices[0].message.content
        (call,) = done.choices[0].message.tool_calls
        assert done.usage.completion_tokens == standin.requests_to("/api/chat")[-1].counts[1]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    (sent,) = [r for r in standin.requests_to("/api/chat") if r.messages]
    assert sent.body["tools"][0]["function"]["name"] == "weather"
    assert sent.body["tools"][0]["function"]["parameters"]["required"] == ["city"]

    # The call and its result go back in the history; Ollama gets them in its shape and answers the result.
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = c.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER])
    assert answer.choices[0].message.content == "Tool said: sunny, 21 C"
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    second = [r for r in standin.requests_to("/api/chat") if r.messages][-1]
    assert second.messages[1:] == [
        {"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "weather"},
    ]
    standin.wait_until(studio.arbiter.is_idle)


@pytest.mark.parametrize("stream", [False, True])
def test_tools_for_an_ollama_model_without_them_are_a_400_that_says_what_to_do(tmp_path, stream):
    """Ollama answers 400 "<model> does not support tools" (tests/ollama_standin.py `no_tools`); Clair passed it
    on as a 503, which clients retry. It is the client's request that cannot be served: a 400 in OpenAI's shape."""
    standin = OllamaStandin({MODEL: 4.9, "deepseek-r1:7b": 4.7}, no_tools=["deepseek-r1:7b"]).start()
    studio = make_studio(standin, tmp_path, preempt="off")
    served = Served(v1_app(studio))
    try:
        c = client(served)
        ask = [{"role": "user", "content": "Paris"}]
        with pytest.raises(openai.BadRequestError) as err:
            answer = c.chat.completions.create(model="deepseek-r1:7b", messages=ask, tools=[WEATHER], stream=stream)
            if stream:
                list(answer)
        assert err.value.status_code == 400
        body = err.value.body
        assert body["type"] == "invalid_request_error" and body["code"] == "tools_unsupported"
        assert "deepseek-r1:7b does not support tools" in body["message"]
        assert "ollama show" in body["message"] and "without `tools`" in body["message"]
        # The same model chats without tools, and the refusal gave everything back.
        assert c.chat.completions.create(model="deepseek-r1:7b", messages=ask).choices[0].message.content
        standin.wait_until(studio.arbiter.is_idle)
        assert studio.jobs.snapshot()["total"] == 0
    finally:
        served.stop()
        standin.stop()


def test_the_in_process_model_answers_with_tools_offered_and_refuses_a_required_call(standin, tmp_path):
    studio = make_studio(standin, tmp_path, chat_backend="local", local_chat_model="tiny")
    served = Served(v1_app(studio))
    try:
        c = client(served)
        done = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
        assert done.choices[0].finish_reason == "stop" and not done.choices[0].message.tool_calls
        # The tokenizer's own count of the prompt as the model saw it (the chat template around "hi").
        prompt = studio.local._tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        assert done.usage.prompt_tokens == len(prompt["input_ids"]) and 0 < done.usage.completion_tokens <= 256
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="required"
            )
        assert "need an Ollama model" in err.value.body["message"]
        call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
        with pytest.raises(openai.BadRequestError) as err:  # its chat template has no tool role
            c.chat.completions.create(
                model="tiny",
                messages=[
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "snow"},
                ],
            )
        assert "Tools need an Ollama model" in err.value.body["message"]
        assert not standin.requests_to("/api/chat")
    finally:
        served.stop()
