"""Chat history normalisation, the in-process chat engine (tiny and loaded from a folder), token streaming, stop,
failures, and the Ollama memory estimate."""

from __future__ import annotations

import os

# Nothing may be fetched: set before huggingface_hub is imported (it reads this once, at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch

from clair.base.config import Config
from clair.base.errors import ChatUnavailable
from clair.engines.chat import LocalChat, flatten_history, token_streamer
from clair.engines.tiny import build_tiny_chat, save_tiny_chat

GiB = 1024**3
pytestmark = pytest.mark.usefixtures("offline")
HELLO = [{"role": "user", "content": "hi"}]


def _local(model: str | Path = "tiny", **kw: object) -> LocalChat:
    return LocalChat(dataclasses.replace(Config(), local_chat_model=str(model), **kw))


def _generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "local-chat-generate" and t.is_alive()]


# -- flatten_history ----------------------------------------------------------------------------------------


def test_flatten_gradio_content_blocks() -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
    ]
    assert flatten_history(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
    ]


def test_flatten_keeps_strings_and_order() -> None:
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    assert flatten_history(history) == history
    assert flatten_history(None) == [] and flatten_history([]) == []


def test_flatten_names_files() -> None:
    block = {"type": "file", "file": {"path": "/tmp/gradio/ab12/name.png", "orig_name": "name.png"}, "alt_text": None}
    no_orig = {"type": "file", "file": {"path": "/tmp/gradio/cd34/photo.jpg", "orig_name": None}}
    history = [
        {"role": "user", "content": [{"type": "text", "text": "look: "}, block]},
        {"role": "user", "content": [no_orig]},
        {"role": "user", "content": {"path": "/tmp/gradio/x/doc.pdf"}},  # a bare FileData dict
    ]
    assert [m["content"] for m in flatten_history(history)] == [
        "look: [file: name.png]",
        "[file: photo.jpg]",
        "[file: doc.pdf]",
    ]


def test_flatten_drops_empty_messages() -> None:
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": "   \n"},
        {"role": "assistant", "content": []},
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
        {"role": "assistant", "content": "ok"},
    ]
    assert flatten_history(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("item", [{"role": "tool", "content": "x"}, {"content": "no role"}, {"role": None}])
def test_flatten_refuses_unknown_roles(item: dict) -> None:
    with pytest.raises(ValueError, match="role"):
        flatten_history([{"role": "user", "content": "hi"}, item])


def test_flatten_accepts_message_objects() -> None:
    @dataclasses.dataclass
    class ChatMessage:  # the shape of gradio.ChatMessage
        role: str
        content: object

    history = [
        ChatMessage("user", "hi"),
        ChatMessage("assistant", [{"type": "text", "text": "hello"}]),
        ChatMessage("assistant", ""),
    ]
    assert flatten_history(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError):
        flatten_history([object()])


# -- token streaming ------------------------------------------------------------------------------------------


def test_token_streamer_emits_every_complete_character() -> None:
    """One chunk per finished character; a multi-byte character waits for its last byte, never shows U+FFFD."""
    _, tok = build_tiny_chat()
    text = "hé €x\nok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte

    streamer = token_streamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=5)
    streamer.put(torch.tensor([[tok.bos_token_id, 5, 6]]))  # the prompt: skipped
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.put(torch.tensor([tok.eos_token_id]))
    streamer.end()
    chunks = [c for c in streamer if c]
    assert "".join(chunks) == text
    assert chunks == list(text)
    assert not any("\ufffd" in c for c in chunks)


def test_token_streamer_flushes_an_unfinished_character_at_the_end() -> None:
    _, tok = build_tiny_chat()
    euro = tok("€", add_special_tokens=False)["input_ids"]
    streamer = token_streamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=5)
    streamer.put(torch.tensor([[tok.bos_token_id]]))
    for i in [*tok("a", add_special_tokens=False)["input_ids"], *euro[:2]]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    chunks = [c for c in streamer if c]
    assert chunks[0] == "a"
    assert "".join(chunks).startswith("a") and "".join(chunks).endswith("\ufffd")  # nothing is lost


# -- LocalChat ------------------------------------------------------------------------------------------------


def test_tiny_streams_text_and_reports_its_footprint() -> None:
    chat = _local(max_new_tokens=16)
    assert chat.problem() is None and chat.models() == ["tiny (random weights)"]
    need_prior, idle_prior = chat.footprint()
    assert need_prior >= idle_prior > 0  # a prior before loading

    chunks = list(chat.stream("tiny", HELLO, threading.Event()))
    assert chunks and all(isinstance(c, str) and c for c in chunks)
    need, idle = chat.footprint()
    assert need >= idle > 0
    assert idle == sum(p.numel() * p.element_size() for p in chat._model.parameters()) + sum(
        b.numel() * b.element_size() for b in chat._model.buffers()
    )
    assert not _generate_threads()


def _count_new_tokens(chat: LocalChat) -> list[int]:
    """Spy on the model's generate(): the list gets the number of new tokens of each call."""
    counts: list[int] = []
    original = chat._model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        counts.append(out.shape[-1] - kwargs["input_ids"].shape[-1])
        return out

    chat._model.generate = generate
    return counts


def test_tiny_reply_arrives_token_by_token() -> None:
    """16 random-weight tokens (few spaces) must not arrive as one burst at the end."""
    chat = _local(max_new_tokens=16)
    chat.load()
    lengths = _count_new_tokens(chat)
    torch.manual_seed(0)  # sampling: fixed for a reproducible reply
    chunks = list(chat.stream("tiny", HELLO, threading.Event()))
    assert lengths and lengths[0] >= 8, lengths
    assert len(chunks) >= lengths[0] // 3, (lengths, chunks)


def test_stop_mid_stream_ends_generation_promptly() -> None:
    chat = _local(max_new_tokens=4096)  # capped at 256 for tiny
    chat.load()
    generated = _count_new_tokens(chat)
    stop = threading.Event()
    stream = chat.stream("tiny", HELLO, stop)
    first = next(stream)
    assert isinstance(first, str) and first
    stop.set()
    t0 = time.monotonic()
    rest = list(stream)
    assert time.monotonic() - t0 < 5
    assert rest == []  # nothing more once stopped
    assert not _generate_threads()  # the worker has ended, not just the reader
    assert generated and generated[0] < 64, generated  # generate() itself stopped, far short of 256 tokens
    assert not chat._lock.locked()

    # The engine is usable again.
    assert list(chat.stream("tiny", HELLO, threading.Event()))


def test_closing_the_stream_stops_the_worker() -> None:
    """A client that goes away closes the generator: generation must stop as well."""
    chat = _local()
    stream = chat.stream("tiny", HELLO, threading.Event())
    next(stream)
    stream.close()
    assert not _generate_threads()
    assert not chat._lock.locked()


def test_loads_a_saved_folder_through_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    import clair.engines.tiny

    folder = save_tiny_chat(tmp_path / "chat")
    loaded: list[str] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(source, *args, _original=original, _name=cls.__name__, **kwargs):
            loaded.append(_name)
            assert source == str(folder)
            return _original(source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)

    def no_tiny(*args: object, **kwargs: object):
        raise AssertionError("a folder must not be built in code")

    monkeypatch.setattr(clair.engines.tiny, "build_tiny_chat", no_tiny)

    chat = _local(folder, max_new_tokens=16)
    assert chat.models() == [str(folder)]
    text = "".join(chat.stream(str(folder), HELLO, threading.Event()))
    assert sorted(loaded) == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert text
    assert chat._model.dtype == torch.float32  # CPU runs fp32
    assert chat.problem() is None


def test_missing_folder_is_explained(tmp_path: Path) -> None:
    folder = tmp_path / "no-such-model"
    chat = _local(folder)
    with pytest.raises(ChatUnavailable) as err:
        list(chat.stream("x", HELLO, threading.Event()))
    message = str(err.value)
    assert "CLAIR_LOCAL_CHAT_MODEL" in message and f"{folder} does not exist" in message
    assert chat.problem() == message
    assert not chat._lock.locked()

    # Fixing the cause is enough: the next request loads the model.
    save_tiny_chat(folder)
    assert "".join(chat.stream("x", HELLO, threading.Event()))
    assert chat.problem() is None


def test_home_relative_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    save_tiny_chat(tmp_path / "models" / "chat")
    chat = _local("~/models/chat", max_new_tokens=4)
    assert "".join(chat.stream("x", HELLO, threading.Event()))
