"""Studio, in-process, against the Ollama stand-in: the parts of the protocol the app tests cannot pin down."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from clair.base.config import Config
from clair.engines.image import RenderParams
from clair.service.studio import Studio, Token, Waiting
from tests.ollama_standin import OllamaStandin

MODEL = "llama3.1:8b"


@pytest.fixture
def standin():
    s = OllamaStandin({MODEL: 4.9}, unload_delay=0.2).start()
    yield s
    s.stop()


def make(standin, tmp_path, **kw) -> Studio:
    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path),
        state_dir=str(tmp_path / "state"),
        warmup_delay_s=0.0,
        **kw,
    )
    return Studio(cfg)


def reply(studio: Studio, text: str) -> str:
    return "".join(e.text for e in studio.chat(text) if isinstance(e, Token))


def test_auto_treats_a_loopback_ollama_as_sharing_the_gpu(standin, tmp_path):
    assert make(standin, tmp_path).ollama.on_this_gpu
    assert not make(standin, tmp_path, ollama_shares_gpu="no").ollama.on_this_gpu


def test_an_ollama_on_another_machine_is_never_evicted_nor_held_back(standin, tmp_path):
    studio = make(standin, tmp_path, ollama_shares_gpu="no")
    assert reply(studio, "hi") == "You said: hi"
    assert standin.loaded() == [MODEL]
    _, info = studio.render(RenderParams("x", steps=2, width=64, height=64))
    assert info["evicted"] == []
    assert standin.loaded() == [MODEL]
    assert not [r for r in standin.requests_to("/api/chat") if r.keep_alive == 0]

    # A chat during a render goes straight to the remote Ollama.
    entered, leave = threading.Event(), threading.Event()

    def slow_step(text, frac):
        if text.startswith("Step"):
            entered.set()
            assert leave.wait(10)

    t = threading.Thread(target=studio.render, args=(RenderParams("y", steps=2, width=64, height=64), slow_step))
    t.start()
    assert entered.wait(10)
    try:
        events = list(studio.chat("during"))
        assert not any(isinstance(e, Waiting) for e in events)
        assert "".join(e.text for e in events if isinstance(e, Token)) == "You said: during"
    finally:
        leave.set()
        t.join(10)


def test_a_chat_held_by_a_render_sees_its_place_and_waits_for_the_release(standin, tmp_path):
    studio = make(standin, tmp_path, preempt="off")  # with preemption the render would pause for it
    assert reply(studio, "warm") == "You said: warm"
    entered, leave = threading.Event(), threading.Event()
    result = {}

    def slow_step(text, frac):
        if text.startswith("Step"):
            entered.set()
            assert leave.wait(10)

    def run():
        result["info"] = studio.render(RenderParams("y", steps=2, width=64, height=64), slow_step)[1]

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(10)
    standin.reset_logs()
    chat = studio.chat("held?")
    first = next(chat)
    assert isinstance(first, Waiting) and first.position == 1 and "render" in first.reason
    assert not standin.requests_to("/api/chat")  # not sent to Ollama while the render holds the GPU
    leave.set()
    text = "".join(e.text for e in chat if isinstance(e, Token))
    t.join(10)
    assert text == "You said: held?"
    sent = [r for r in standin.requests_to("/api/chat") if r.messages]
    assert sent[0].arrived >= result["info"]["gpu_finished_at"]


def test_closing_a_held_chat_releases_its_place(standin, tmp_path):
    """A browser tab closed while its chat waits: the generator is closed, nothing stays queued."""
    studio = make(standin, tmp_path)
    render = studio.arbiter.request("render", "image", 1).wait(1)
    chat = studio.chat("bye")
    assert isinstance(next(chat), Waiting)
    chat.close()
    assert studio.arbiter.status()["waiting"] == []
    render.release()
    assert studio.arbiter.is_idle()


def test_imagine_makes_a_prompt_and_the_render_reaches_the_gpu_only_after_the_chat_lets_go(tmp_path):
    """Imagine asks the chat model with its fixed instruction, reads the stand-in's scripted answer, and the
    render that follows (asked for while the reply still streams) takes the GPU only after the chat let go."""
    from clair.service.studio import IMAGINE_SYSTEM

    seen = []

    def answer(body):
        seen.append(body)
        return "Here you go:\n**Prompt:** a red lighthouse at dusk, oil painting\nNegative: blurry, people\n"

    standin = OllamaStandin({MODEL: 4.9}, unload_delay=0.2, token_delay=0.05, reply=answer).start()
    try:
        studio = make(standin, tmp_path, warmup=False)
        history = [{"role": "user", "content": "I'd like a lighthouse"}, {"role": "assistant", "content": "Nice!"}]
        stream = studio.imagine("a lighthouse, but red and at dusk", history)
        first = next(e for e in stream if isinstance(e, Token))
        # The reply is streaming: the render is asked for now, from another thread.
        result = {}
        t = threading.Thread(
            target=lambda: result.update(info=studio.render(RenderParams("x", steps=2, width=64, height=64))[1])
        )
        t.start()
        reply = first.text + "".join(e.text for e in stream if isinstance(e, Token))
        from clair.service.studio import parse_imagined

        prompt, negative = parse_imagined(reply)
        assert (prompt, negative) == ("a red lighthouse at dusk, oil painting", "blurry, people")
        t.join(30)
        [body] = seen
        assert body["messages"][0] == {"role": "system", "content": IMAGINE_SYSTEM}
        assert body["messages"][1:3] == history
        assert "a lighthouse, but red and at dusk" in body["messages"][-1]["content"]
        [chat] = [r for r in standin.requests_to("/api/chat") if r.messages]
        info = result["info"]
        assert chat.finished is not None and info["gpu_started_at"] >= chat.finished
        assert "ollama" in info["evicted"]  # the arbiter handed the GPU over: the chat model left for the render

        # The one-call form, then the render of what it made.
        assert studio.imagine_prompt("a lighthouse") == ("a red lighthouse at dusk, oil painting", "blurry, people")
        _, info = studio.render(RenderParams(prompt, negative, steps=2, width=64, height=64, seed=7))
        assert info["prompt"] == prompt and info["negative_prompt"] == negative
        last_chat = [r for r in standin.requests_to("/api/chat") if r.messages][-1]
        assert info["gpu_started_at"] >= last_chat.finished
    finally:
        standin.stop()


def test_imagine_falls_back_to_whatever_came_back(standin, tmp_path):
    """A model that ignores the instruction (the demo's tiny one) still fills the fields."""
    from clair.service.studio import DEFAULT_NEGATIVE

    studio = make(standin, tmp_path)
    prompt, negative = studio.imagine_prompt("stormy sea")  # the stand-in answers "You said: ..."
    assert prompt.startswith("You said: The idea: stormy sea") and negative == DEFAULT_NEGATIVE
    with pytest.raises(Exception, match="Describe the image first"):
        studio.imagine_prompt("   ")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("PROMPT: a cat on a roof\nNEGATIVE: dogs", ("a cat on a roof", "dogs")),
        ("Sure!\n**Prompt:** a cat, *soft light*\n\n**Negative prompt:**\nugly, text\n", ("a cat, *soft light*", "ugly, text")),
        ("- prompt = \"a cat\"\n- negative_prompt: 'blur'", ("a cat", "blur")),
        ("Prompt:\n  a cat\n  on a roof\nNegative:", ("a cat on a roof", None)),
        ("just some words here", ("just some words here", None)),
        ("", ("the idea", None)),
        ("negative: only this", ("the idea", "only this")),
    ],
)
def test_parse_imagined_reads_what_models_write(reply, expected):
    from clair.service.studio import DEFAULT_NEGATIVE, parse_imagined

    prompt, negative = parse_imagined(reply, "the idea")
    assert prompt == expected[0]
    assert negative == (expected[1] or DEFAULT_NEGATIVE)
    assert parse_imagined("PROMPT: " + "x" * 50, limit=10)[0] == "x" * 10
