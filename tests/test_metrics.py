"""/metrics (issue 9): the series exist, they move when a chat and a render run, and only this machine
may scrape without a login.

The app is the real one (`make_app`: the guard, Gradio mounted, the /metrics route) driven in process
through Starlette's TestClient, whose `client=` sets the ASGI client address: ("127.0.0.1", …) is a
scraper on this machine, ("192.168.77.10", …) one on the LAN. Chats go to the Ollama stand-in over real
HTTP; renders use the tiny pipeline.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from starlette.testclient import TestClient

from clair.base.config import Config
from clair.base.errors import ChatUnavailable
from clair.edge.users import Users
from clair.engines.image import RenderParams
from clair.service.metrics import SERIES
from clair.service.studio import Studio, Token
from tests.ollama_standin import OllamaStandin

MODEL = "llama3.1:8b"
BASE = "http://127.0.0.1:7860"
LOCAL = ("127.0.0.1", 40000)
LAN = ("192.168.77.10", 40000)


@pytest.fixture(scope="module")
def standin():
    s = OllamaStandin({MODEL: 4.9}, unload_delay=0.02, token_delay=0.005).start()
    yield s
    s.stop()


def build(tmp_path, standin, users: bool):
    from clair.adapters.ui import build as build_ui
    from clair.main import make_app

    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path / "out"),
        users_file=str(tmp_path / "users.json"),
        warmup=False,
    )
    if users:
        Users(cfg.users_path).set_password("alice", "a long household password")
    studio = Studio(cfg)
    return studio, make_app(studio, build_ui(studio), Users(cfg.users_path))


def samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(s: dict[str, float], name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in s.items() if re.match(rf"{name}(\{{|$)", k) and all(w in k for w in want))


def test_metrics_name_every_series_and_move_with_a_chat_and_a_render(tmp_path, standin):
    studio, app = build(tmp_path, standin, users=True)
    with TestClient(app, base_url=BASE, client=LOCAL) as local:
        first = local.get("/metrics")
        assert first.status_code == 200, first.text  # loopback: no login, although there are users
        assert first.headers["content-type"].startswith("text/plain")
        for name in SERIES:
            assert f"# TYPE {name} " in first.text, name
        before = samples(first.text)

        reply = "".join(e.text for e in studio.chat("hello there") if isinstance(e, Token))
        assert reply
        _, info = studio.render(RenderParams("a lighthouse", steps=4, width=64, height=64, seed=3))
        after = samples(local.get("/metrics").text)

    # The chat: counted, with its time to first token and its speed.
    assert total(after, "clair_chats_total", backend="ollama") == total(before, "clair_chats_total") + 1
    assert total(after, "clair_chat_tokens_total") >= total(before, "clair_chat_tokens_total") + 2
    assert total(after, "clair_chat_time_to_first_token_seconds_count") == 1
    assert total(after, "clair_chat_tokens_per_second_count") == 1
    # The render: its steps and seconds; the image model's load; the hand-over that evicted Ollama for it.
    assert total(after, "clair_renders_total") == 1
    assert total(after, "clair_render_steps_total") == 4
    assert total(after, "clair_render_seconds_count") == 1 and total(after, "clair_render_seconds_sum") > 0
    assert total(after, "clair_load_seconds_count") == 1
    assert "ollama" in info["evicted"]
    assert total(after, "clair_handovers_total", kind="render") == 1
    assert total(after, "clair_handover_seconds_count", kind="render") == 1
    assert total(after, "clair_evict_seconds_count", tenant="ollama") == 1
    # The ledger: the image model is resident at its weights; nothing holds the GPU or waits now.
    assert total(after, "clair_vram_ledger_bytes", tenant="image") > 0
    assert total(after, "clair_gpu_holder") == 0 and total(after, "clair_queue_depth") == 0
    assert total(after, "clair_errors_total") == 0


def test_errors_are_counted_by_kind(tmp_path, standin):
    studio, app = build(tmp_path, standin, users=False)
    with pytest.raises(ChatUnavailable):
        list(studio.chat("hi", model="no-such-model"))
    with TestClient(app, base_url=BASE, client=LOCAL) as local:
        after = samples(local.get("/metrics").text)
    assert total(after, "clair_errors_total", what="chat", kind="ChatUnavailable") == 1


def test_a_lan_scrape_needs_a_login(tmp_path, standin):
    _, app = build(tmp_path, standin, users=True)
    with TestClient(app, base_url=BASE, client=LAN) as lan:
        refused = lan.get("/metrics")
        assert refused.status_code == 401
        assert "clair_" not in refused.text


def test_a_scrape_forwarded_by_an_untrusted_local_proxy_needs_a_login(tmp_path, standin, caplog):
    """A reverse proxy on this machine that CLAIR_TRUSTED_PROXIES does not name forwards LAN clients from
    127.0.0.1: a request carrying X-Forwarded-For (or Forwarded, X-Real-IP) is not local, and Clair says once
    how to trust the proxy. Without the header, this machine's own scraper still needs no login."""
    _, app = build(tmp_path, standin, users=True)
    with TestClient(app, base_url=BASE, client=LOCAL) as local:
        assert local.get("/metrics").status_code == 200
        for header in ({"X-Forwarded-For": "192.0.2.77"}, {"Forwarded": "for=192.0.2.77"}, {"X-Real-IP": "192.0.2.77"}):
            refused = local.get("/metrics", headers=header)
            assert refused.status_code == 401 and "clair_" not in refused.text, header
    assert sum("CLAIR_TRUSTED_PROXIES=127.0.0.1" in r.getMessage() for r in caplog.records) == 1
