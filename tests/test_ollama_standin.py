"""Tests for the Ollama stand-in, driven through the official ``ollama`` client where possible.

They pin the behaviour Clair depends on (docs/facts.md, "Ollama"): streaming format, load/unload
answers, the unload that answers before the memory is free, keep_alive parsing and error shapes.
Orderings are checked through the stand-in's event and request logs and gates, never with sleeps.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import ollama
import pytest

from tests.ollama_standin import (
    GB,
    GO_MAX_DURATION_S,
    Event,
    OllamaStandin,
    keep_alive_from_env,
    keep_alive_from_json,
    loaded_size_bytes,
    parse_go_duration,
    split_tokens,
)

BIG = "llama3.1:8b"
SMALL = "qwen2.5:0.5b"
MID = "gemma2:2b"
LOAD_DELAY = 0.05
UNLOAD_DELAY = 0.2
HELLO = [{"role": "user", "content": "hello there"}]
STANDIN_FILE = Path(__file__).with_name("ollama_standin.py")


@pytest.fixture
def standin() -> Iterator[OllamaStandin]:
    with OllamaStandin({BIG: 4.9, SMALL: 0.4, MID: 1.6}, load_delay=LOAD_DELAY, unload_delay=UNLOAD_DELAY) as server:
        yield server


def make_client(url: str) -> ollama.Client:
    # Plain HTTP on loopback: verify=False only skips loading the CA bundle, ~50 ms per client.
    return ollama.Client(host=url, timeout=10, verify=False)


@pytest.fixture
def client(standin: OllamaStandin) -> Iterator[ollama.Client]:
    with make_client(standin.url) as c:
        yield c


@pytest.fixture
def http(standin: OllamaStandin) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=standin.url, verify=False, timeout=10) as c:
        yield c


def kinds(events: list[Event]) -> list[str]:
    return [event.kind for event in events]


def first(events: list[Event], kind: str) -> Event:
    return next(event for event in events if event.kind == kind)


def ps_entry(client: ollama.Client, model: str) -> ollama.ProcessResponse.Model:
    return next(m for m in client.ps().models if m.model == model)


# ------------------------------------------------------------------------------------------ plain endpoints


def test_liveness_and_version(http: httpx.Client) -> None:
    root = http.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    for path in ("/", "/api/version", "/api/tags"):
        head = http.head(path)
        assert head.status_code == 200 and head.content == b"", path
    assert http.get("/api/version").json() == {"version": "0.12.0-standin"}
    assert http.get("/api/nope").status_code == 404


def test_list_reports_installed_models_with_disk_sizes(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert set(models) == {BIG, SMALL, MID}
    big = models[BIG]
    assert big.size == int(4.9 * GB)
    assert big.details is not None
    assert (big.details.family, big.details.parameter_size, big.details.format) == ("llama", "8.0B", "gguf")
    assert big.modified_at is not None and big.modified_at.tzinfo is not None  # RFC 3339 parsed
    assert big.digest is not None and len(big.digest) == 64


def test_add_model_normalises_untagged_names(standin: OllamaStandin, client: ollama.Client) -> None:
    standin.add_model("mistral", 4.1)
    assert "mistral:latest" in {m.model for m in client.list().models}
    # Ollama resolves a name without a tag to :latest.
    assert client.chat("mistral", messages=HELLO).message.content == "You said: hello there"
    assert standin.loaded() == ["mistral:latest"]


# ------------------------------------------------------------------------------------------------ chatting


def test_streaming_chat_sends_token_chunks_then_a_done_chunk(standin: OllamaStandin, client: ollama.Client) -> None:
    assert client.ps().models == []
    chunks = list(client.chat(BIG, messages=HELLO, stream=True))

    *tokens, final = chunks
    assert [c.message.content for c in tokens] == ["You", " said:", " hello", " there"]
    assert not any(c.done for c in tokens)
    assert final.done and final.done_reason == "stop" and final.message.content == ""
    assert final.eval_count == len(tokens)
    assert final.prompt_eval_count == 2
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        value = getattr(final, field)
        assert isinstance(value, int) and value > 0, field
    # This request paid for the load, and the total covers it.
    assert final.load_duration >= LOAD_DELAY * 1e9
    assert final.total_duration >= final.load_duration

    entry = ps_entry(client, BIG)
    assert entry.size == entry.size_vram == loaded_size_bytes(BIG, int(4.9 * GB), 4096) == 6_200_000_000
    assert entry.context_length == 4096
    # An omitted keep_alive on a new load gets the server default of 5 minutes.
    assert entry.expires_at is not None
    remaining = entry.expires_at - datetime.now(UTC)
    assert timedelta(minutes=4, seconds=50) < remaining <= timedelta(minutes=5)

    # Already loaded: no load time the second time.
    again = list(client.chat(BIG, messages=HELLO, stream=True))[-1]
    assert again.load_duration == 0
    assert kinds(standin.events) == ["load_start", "loaded"]


def test_stream_content_type_is_ndjson_and_server_streams_by_default(http: httpx.Client) -> None:
    # No "stream" key at all: the server's default is to stream (the Python client always sends it).
    body = {"model": SMALL, "messages": HELLO}
    with http.stream("POST", "/api/chat", json=body) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [line for line in response.iter_lines() if line]
    assert len(lines) == 5  # four tokens, one done line


def test_non_streaming_chat_returns_the_whole_message(standin: OllamaStandin, client: ollama.Client) -> None:
    response = client.chat(SMALL, messages=HELLO, stream=False)
    assert response.done and response.done_reason == "stop"
    assert response.message.content == "You said: hello there"
    assert response.eval_count == 4 and response.load_duration >= LOAD_DELAY * 1e9
    record = standin.requests_to("/api/chat")[-1]
    assert record.status == 200 and record.lines == 0  # a single JSON object, not a stream


def test_generate_streams_response_fragments(client: ollama.Client) -> None:
    chunks = list(client.generate(SMALL, prompt="ping pong", stream=True))
    assert "".join(c.response for c in chunks) == "You said: ping pong"
    assert chunks[-1].done and chunks[-1].done_reason == "stop"


def test_replies_are_scriptable(standin: OllamaStandin, client: ollama.Client) -> None:
    standin.queue_reply(["Bon", "jour", "!"], model=SMALL)
    standin.queue_reply("queued for anyone")
    standin.reply_fn = lambda body: f"fn saw {len(body['messages'])} message(s)"

    tokens = [c.message.content for c in client.chat(SMALL, messages=HELLO, stream=True)][:-1]
    assert tokens == ["Bon", "jour", "!"]  # a list is streamed one element per chunk
    assert client.chat(BIG, messages=HELLO).message.content == "queued for anyone"
    assert client.chat(BIG, messages=HELLO).message.content == "fn saw 1 message(s)"


def test_num_predict_cuts_the_reply_with_done_reason_length(client: ollama.Client) -> None:
    chunks = list(client.chat(SMALL, messages=HELLO, stream=True, options={"num_predict": 2}))
    assert "".join(c.message.content for c in chunks) == "You said:"
    assert chunks[-1].done_reason == "length" and chunks[-1].eval_count == 2


def test_num_ctx_sets_context_length_and_memory(standin: OllamaStandin, client: ollama.Client) -> None:
    client.chat(BIG, messages=HELLO, options={"num_ctx": 32768})
    entry = ps_entry(client, BIG)
    assert entry.context_length == 32768
    # ~4 GiB of KV cache at 32k for an 8B model (docs/facts.md, "Ollama").
    kv = entry.size - loaded_size_bytes(BIG, int(4.9 * GB), 0)
    assert kv == pytest.approx(4 * 1024**3, rel=0.01)


def test_changing_num_ctx_reloads_the_model(standin: OllamaStandin, client: ollama.Client) -> None:
    client.chat(BIG, messages=HELLO, options={"num_ctx": 8192})
    # Omitting num_ctx means the default context, which differs from the loaded one: Ollama reloads.
    client.chat(BIG, messages=HELLO)
    assert kinds(standin.events_for(BIG)) == [
        "load_start",
        "loaded",
        "unload_requested",
        "unloading",
        "unloaded",
        "load_start",
        "loaded",
    ]
    assert ps_entry(client, BIG).context_length == 4096


def test_partial_offload_when_vram_is_short(standin: OllamaStandin, client: ollama.Client) -> None:
    standin.vram_total_bytes = 8 * GB
    standin.vram_used_elsewhere = 6 * GB  # e.g. SDXL still resident
    client.chat(BIG, messages=HELLO)  # no error: Ollama silently offloads layers instead
    entry = ps_entry(client, BIG)
    assert entry.size_vram == 2 * GB < entry.size


# ---------------------------------------------------------------------------------------- loading/unloading


def test_empty_messages_loads_the_model(standin: OllamaStandin, client: ollama.Client) -> None:
    response = client.chat(BIG, messages=[], keep_alive="10m")
    assert response.done and response.done_reason == "load"
    assert standin.loaded() == [BIG]
    start, loaded = standin.events_for(BIG)
    assert (start.kind, loaded.kind) == ("load_start", "loaded")
    assert loaded.at - start.at >= LOAD_DELAY * 0.9
    # The answer came only after the load finished.
    assert standin.requests_to("/api/chat")[-1].finished >= loaded.at


def test_empty_prompt_loads_via_generate(standin: OllamaStandin, client: ollama.Client) -> None:
    assert client.generate(SMALL, prompt="").done_reason == "load"
    assert client.generate(SMALL, keep_alive=0).done_reason == "unload"
    standin.wait_until(lambda: not standin.loaded())


def test_unload_answers_before_the_model_leaves_ps(standin: OllamaStandin, client: ollama.Client) -> None:
    client.chat(BIG, messages=[])
    response = client.chat(BIG, keep_alive=0)
    assert response.done_reason == "unload"
    answered = standin.requests_to("/api/chat")[-1].finished
    assert answered is not None

    # The answer is not the memory coming back: the model is still listed (docs/facts.md, "Ollama").
    assert BIG in {m.model for m in client.ps().models}
    assert standin.state(BIG) == "unloading"

    standin.wait_until(lambda: client.ps().models == [], timeout=2)
    gone = first(standin.events_for(BIG), "unloaded")
    assert gone.at - answered >= UNLOAD_DELAY * 0.75


def test_unload_of_a_model_that_is_not_loaded_is_fine(standin: OllamaStandin, client: ollama.Client) -> None:
    assert client.chat(MID, keep_alive=0).done_reason == "unload"
    assert standin.events == []


def test_unload_waits_for_a_request_still_generating(standin: OllamaStandin, client: ollama.Client) -> None:
    client.chat(BIG, messages=[])
    gate = standin.hold(BIG)
    replies: list[str] = []
    # A separate client, as another browser tab would have.
    worker = threading.Thread(
        target=lambda: replies.append(make_client(standin.url).chat(BIG, messages=HELLO).message.content)
    )
    worker.start()
    gate.wait_reached()

    assert client.chat(BIG, keep_alive=0).done_reason == "unload"  # answered at once, even so
    assert kinds(standin.events_for(BIG)) == ["load_start", "loaded", "unload_requested"]
    assert standin.state(BIG) == "ready"  # nothing happens while the request generates

    released = time.time()
    gate.release()
    worker.join(timeout=5)
    assert replies == ["You said: hello there"]
    standin.wait_until(lambda: not standin.loaded(), timeout=2)
    events = standin.events_for(BIG)
    assert kinds(events)[3:] == ["unloading", "unloaded"]
    assert first(events, "unloading").at >= released
    assert first(events, "unloaded").at - first(events, "unloading").at >= UNLOAD_DELAY * 0.9


def test_chat_with_keep_alive_zero_unloads_after_answering(standin: OllamaStandin, client: ollama.Client) -> None:
    assert client.chat(SMALL, messages=HELLO, keep_alive=0).message.content == "You said: hello there"
    standin.wait_until(lambda: not standin.loaded(), timeout=2)
    assert kinds(standin.events_for(SMALL))[-2:] == ["unloading", "unloaded"]


def test_keep_alive_expiry_unloads(standin: OllamaStandin, client: ollama.Client) -> None:
    client.chat(SMALL, messages=[], keep_alive="100ms")
    standin.wait_until(lambda: not standin.loaded(), timeout=2)
    events = standin.events_for(SMALL)
    assert kinds(events) == ["load_start", "loaded", "unload_requested", "unloading", "unloaded"]
    assert first(events, "unloading").at - first(events, "loaded").at >= 0.09


def test_loading_beyond_max_loaded_models_evicts_the_least_recently_used(client: ollama.Client) -> None:
    with OllamaStandin({BIG: 4.9, SMALL: 0.4, MID: 1.6}, max_loaded_models=2, unload_delay=0.05) as standin:
        c = make_client(standin.url)
        c.chat(BIG, messages=[])
        c.chat(SMALL, messages=[])
        c.chat(BIG, messages=HELLO)  # BIG is now the most recently used
        c.chat(MID, messages=[])
        assert sorted(standin.loaded()) == sorted([BIG, MID])
        events = standin.events
        # The newcomer waited for the evicted model's memory before loading.
        evicted = next(e for e in events if e.kind == "unloaded" and e.model == SMALL)
        mid_start = next(e for e in events if e.kind == "load_start" and e.model == MID)
        assert evicted.at <= mid_start.at


# -------------------------------------------------------------------------------------------------- errors


def test_unknown_model_is_404_before_any_scheduling(standin: OllamaStandin, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as excinfo:
        client.chat("nope:1b", messages=HELLO)
    assert excinfo.value.status_code == 404
    assert excinfo.value.error == "model 'nope:1b' not found"
    with pytest.raises(ollama.ResponseError) as excinfo:
        client.chat("nope:1b", keep_alive=0)
    assert excinfo.value.status_code == 404
    assert standin.events == []


def test_tools_offered_to_a_model_without_them_are_400_before_any_load() -> None:
    """Ollama checks a model's capabilities before scheduling: 400 and the model's registry name (ollama/ollama
    issues 6027 and 14795, "registry.ollama.ai/library/Qwen3.5:0.8b does not support tools")."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with OllamaStandin({"deepseek-r1:7b": 4.7, "llama3.1:8b": 4.9}, no_tools=["deepseek-r1:7b"]) as s:
        c = ollama.Client(host=s.url)
        with pytest.raises(ollama.ResponseError) as excinfo:
            c.chat("deepseek-r1:7b", messages=HELLO, tools=[tool])
        assert excinfo.value.status_code == 400
        assert excinfo.value.error == "registry.ollama.ai/library/deepseek-r1:7b does not support tools"
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "deepseek-r1:7b", "messages": HELLO, "tools": [tool]})
        assert r.status_code == 400 and r.json()["error"] == {
            "message": "registry.ollama.ai/library/deepseek-r1:7b does not support tools", "type": "api_error",
            "param": None, "code": None,
        }
        assert s.events == []  # nothing loaded
        assert c.chat("deepseek-r1:7b", messages=HELLO).message.content  # without tools it chats
        assert c.chat("llama3.1:8b", messages=HELLO, tools=[tool]).message.tool_calls  # a model with tools
        assert c.show("deepseek-r1:7b").capabilities == ["completion"]
        assert c.show("llama3.1:8b").capabilities == ["completion", "tools"]


def test_error_line_mid_stream_raises_status_minus_one(standin: OllamaStandin, client: ollama.Client) -> None:
    standin.fail_next(SMALL, after_chunks=2, error="CUDA error: out of memory")
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as excinfo:
        for chunk in client.chat(SMALL, messages=HELLO, stream=True):
            received.append(chunk.message.content)
    assert excinfo.value.status_code == -1
    assert excinfo.value.error == "CUDA error: out of memory"
    assert received == ["You", " said:"]
    record = standin.requests_to("/api/chat")[-1]
    assert record.status == 200 and record.error == "CUDA error: out of memory"
    # The failure was one-shot.
    assert client.chat(SMALL, messages=HELLO).message.content == "You said: hello there"


def test_injected_http_error_before_streaming(standin: OllamaStandin, client: ollama.Client) -> None:
    standin.fail_next(SMALL, status=500, error="llama runner process has terminated")
    with pytest.raises(ollama.ResponseError) as excinfo:
        list(client.chat(SMALL, messages=HELLO, stream=True))
    assert (excinfo.value.status_code, excinfo.value.error) == (500, "llama runner process has terminated")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", None),
        (b"", "missing request body"),
        (b'{"messages": []}', "model is required"),
        (b'{"model": "qwen2.5:0.5b", "keep_alive": "300"}', 'time: missing unit in duration "300"'),
    ],
)
def test_bad_requests_are_400(standin: OllamaStandin, http: httpx.Client, body: bytes, message: str | None) -> None:
    response = http.post("/api/chat", content=body)
    assert response.status_code == 400
    if message is not None:
        assert response.json() == {"error": message}
    assert standin.events == []


# ---------------------------------------------------------------------------------------------- keep_alive


def test_unitless_keep_alive_string_is_rejected_through_the_client(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as excinfo:
        client.chat(SMALL, messages=HELLO, keep_alive="300")
    assert excinfo.value.status_code == 400
    assert excinfo.value.error == 'time: missing unit in duration "300"'


@pytest.mark.parametrize(
    ("keep_alive", "seconds"),
    [(90, 90), ("1h30m", 5400), ("2m", 120), (-1, math.inf), ("-1m", math.inf)],
)
def test_keep_alive_sets_expires_at(client: ollama.Client, keep_alive: float | str, seconds: float) -> None:
    client.chat(BIG, messages=[], keep_alive=keep_alive)
    expires_at = ps_entry(client, BIG).expires_at
    assert expires_at is not None
    if math.isinf(seconds):
        # Negative = forever: Ollama shows now + math.MaxInt64 ns (~292 years), i.e. the year 2318 for
        # anything before September 2026 (docs/facts.md, "Ollama"), 2319 after.
        forever = datetime.now(UTC) + timedelta(seconds=GO_MAX_DURATION_S)
        assert abs((forever - expires_at).total_seconds()) < 5
        assert expires_at.year in (2318, 2319)
    else:
        remaining = (expires_at - datetime.now(UTC)).total_seconds()
        assert seconds - 5 < remaining <= seconds


def test_omitted_keep_alive_keeps_a_loaded_models_duration(client: ollama.Client) -> None:
    client.chat(BIG, messages=[], keep_alive="1h")
    client.chat(BIG, messages=HELLO)  # no keep_alive: the model keeps its 1 h, not the 5 m default
    remaining = (ps_entry(client, BIG).expires_at - datetime.now(UTC)).total_seconds()
    assert 3500 < remaining <= 3600


def test_go_duration_parser_matches_go() -> None:
    assert parse_go_duration("5m") == 300
    assert parse_go_duration("1h30m") == 5400
    assert parse_go_duration("300ms") == pytest.approx(0.3)
    assert parse_go_duration("-1.5h") == -5400
    assert parse_go_duration("0") == parse_go_duration("0s") == 0
    for bad, message in [
        ("300", 'time: missing unit in duration "300"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("", 'time: invalid duration ""'),
        ("m", 'time: invalid duration "m"'),
    ]:
        with pytest.raises(ValueError) as excinfo:
            parse_go_duration(bad)
        assert str(excinfo.value) == message


def test_keep_alive_values_as_ollama_decodes_them() -> None:
    assert keep_alive_from_json(None) is None  # omitted
    assert keep_alive_from_json(0) == keep_alive_from_json("0s") == 0
    assert keep_alive_from_json(0.5) == 0  # JSON numbers are truncated to whole seconds
    assert keep_alive_from_json(-5) == keep_alive_from_json("-1m") == math.inf
    with pytest.raises(ValueError, match="Unsupported type"):
        keep_alive_from_json(True)
    # The server default (OLLAMA_KEEP_ALIVE) does accept bare seconds.
    assert keep_alive_from_env("300") == 300 and keep_alive_from_env("5m") == 300


def test_split_tokens_round_trips() -> None:
    text = "  Hello,  world!\nBye"
    assert "".join(split_tokens(text)) == text
    assert split_tokens("") == []


# ------------------------------------------------------------------------------------- logs and the harness


def test_request_log_records_what_ollama_saw(standin: OllamaStandin, client: ollama.Client) -> None:
    before = time.time()
    list(client.chat(SMALL, messages=HELLO, stream=True, keep_alive="1m", options={"num_ctx": 2048}))
    client.ps()
    chat, ps = standin.requests
    assert (chat.method, chat.path, chat.status) == ("POST", "/api/chat", 200)
    assert chat.model == SMALL and chat.messages == HELLO
    assert chat.keep_alive == "1m" and chat.options == {"num_ctx": 2048}
    assert chat.lines == 5 and not chat.aborted
    assert before <= chat.arrived <= chat.finished <= ps.arrived
    assert (ps.method, ps.path, ps.body) == ("GET", "/api/ps", None)


def test_client_closing_a_stream_releases_the_model(standin: OllamaStandin, client: ollama.Client) -> None:
    standin.token_delay = 0.02
    standin.queue_reply("one two three four five six seven eight nine ten")
    stream = client.chat(SMALL, messages=HELLO, stream=True, keep_alive=0)
    next(stream)
    stream.close()  # the user pressed stop
    # The server notices at its next write, ends the request, and the keep_alive 0 unload proceeds.
    standin.wait_until(lambda: not standin.loaded(), timeout=3)
    assert standin.requests_to("/api/chat")[-1].aborted


def test_ps_can_block_during_an_unload_like_newer_servers(standin: OllamaStandin, client: ollama.Client) -> None:
    standin.ps_blocks_during_unload = True
    client.chat(SMALL, messages=[])
    client.chat(SMALL, keep_alive=0)
    # The first ps after the unload answer already shows it gone: the call waited for the unload.
    assert client.ps().models == []
    ps = standin.requests_to("/api/ps")[-1]
    assert ps.finished >= first(standin.events_for(SMALL), "unloaded").at


def test_restart_drops_loaded_models_and_keeps_the_port(standin: OllamaStandin, client: ollama.Client) -> None:
    client.chat(SMALL, messages=[])
    url = standin.url
    standin.stop()
    with pytest.raises(ConnectionError):  # the client's builtin ConnectionError when nobody listens
        client.ps()
    standin.start()
    assert standin.url == url
    assert client.ps().models == []
    assert client.chat(SMALL, messages=HELLO).message.content == "You said: hello there"


def test_wait_until_times_out(standin: OllamaStandin) -> None:
    with pytest.raises(TimeoutError):
        standin.wait_until(lambda: False, timeout=0.1)


def test_cli_help_and_standalone_server() -> None:
    help_run = subprocess.run([sys.executable, str(STANDIN_FILE), "--help"], capture_output=True, text=True, timeout=30)
    assert help_run.returncode == 0 and "--load-delay" in help_run.stdout

    process = subprocess.Popen(
        [sys.executable, str(STANDIN_FILE), "--port", "0", "--model", "tiny:1b=0.1", "--token-delay", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in banner
        url = banner.split("listening on ")[1].split()[0]
        assert httpx.get(url + "/", verify=False).text == "Ollama is running"
        assert [m.model for m in make_client(url).list().models] == ["tiny:1b"]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_ps_fails_and_hangs_on_demand(standin: OllamaStandin, client: ollama.Client) -> None:
    client.chat(SMALL, messages=HELLO)
    standin.fail_ps(2)
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as err:
            client.ps()
        assert err.value.status_code == 500
    assert [m.model for m in client.ps().models] == [SMALL]
    standin.hang_ps(1, seconds=5)
    quick = ollama.Client(host=standin.url, timeout=0.3)
    with pytest.raises(httpx.TimeoutException):
        quick.ps()
    assert [m.model for m in client.ps().models] == [SMALL]


def test_loaded_sizes_come_from_the_table_not_from_a_formula() -> None:
    # Real `ollama ps` figures: larger than file + KV cache (compute graph, per-GPU floor).
    assert loaded_size_bytes("llama3.1:8b", int(4.9 * GB), 4096) == 6_200_000_000
    assert loaded_size_bytes("llama3:8b", int(4.7 * GB), 2048) == 5_400_000_000
    assert loaded_size_bytes("phi4", int(9.1 * GB), 4096) > 11 * GB
    # A model not in the table is still well above its file plus the KV cache.
    assert loaded_size_bytes("other:7b", int(4.0 * GB), 4096) > 4.0 * GB * 1.2
