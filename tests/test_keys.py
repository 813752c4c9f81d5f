"""API keys (clair/edge/keys.py) and what the gateway decides for the GPU (clair/adapters/gateway.py: keep_alive, num_ctx)."""

from __future__ import annotations

import dataclasses
import io
import json
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clair.adapters.gateway import decide, keep_alive_seconds
from clair.base.config import Config
from clair.edge.keys import Keys, bearer, command, keys_path
from clair.edge.users import UserError


def test_a_key_is_stored_as_a_hash_only_and_verifies(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys.json")
    key, new = keys.add("laptop")
    assert new and key.startswith("clair-") and len(key) > 40
    text = (tmp_path / "keys.json").read_text()
    assert key not in text and key[6:] not in text
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert keys.verify(key) == "laptop"
    for wrong in ("", key[:-1], key + "a", key.upper(), "clair-" + "A" * 43, None, "x" * 10_000):
        assert keys.verify(wrong) is None
    # A second key for the name replaces the first; another name is separate.
    again, new = keys.add("laptop")
    assert not new and keys.verify(key) is None and keys.verify(again) == "laptop"
    other, _ = keys.add("phone")
    assert keys.verify(other) == "phone" and keys.names() == ["laptop", "phone"]
    keys.delete("laptop")
    assert keys.verify(again) is None and keys.names() == ["phone"]
    with pytest.raises(UserError):
        keys.delete("laptop")


def test_changes_by_another_process_apply_at_once(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    server, cli = Keys(path), Keys(path)
    assert server.verify("clair-x") is None
    key, _ = cli.add("alice")
    assert server.verify(key) == "alice"
    cli.delete("alice")
    assert server.verify(key) is None


def test_an_unreadable_keys_file_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="addkey"):
        Keys(path).verify("clair-x")
    path.write_text(json.dumps({"keys": {"a": {"sha256": "é" * 64}}}))
    assert Keys(path).verify("clair-x") is None  # a mangled entry matches nothing, and does not crash


def test_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        Keys(tmp_path / "keys.json").add("../evil")


def test_commands_print_the_key_once_and_never_again(tmp_path: Path) -> None:
    keys = Keys(keys_path(tmp_path / "users.json"))
    assert keys.path == tmp_path / "keys.json"
    out = io.StringIO()
    assert command(["addkey", "bob"], keys, out=out) == 0
    key = next(line for line in out.getvalue().splitlines() if line.startswith("clair-"))
    assert keys.verify(key) == "bob"
    listed = io.StringIO()
    assert command(["keys"], keys, out=listed) == 0
    assert listed.getvalue().startswith("bob\tclair-") and key not in listed.getvalue()
    assert command(["delkey", "bob"], keys, out=io.StringIO()) == 0
    assert keys.names() == []
    with pytest.raises(UserError, match="Usage"):
        command(["addkey"], keys)


def test_bearer() -> None:
    assert bearer("Bearer clair-abc") == "clair-abc"
    assert bearer("bearer   clair-abc ") == "clair-abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer ", "clair-abc", "Bearer " + "x" * 300):
        assert bearer(bad) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), (300, 300.0), (2.9, 2.0), (-1, float("inf")), ("5m", 300.0), ("1h30m", 5400.0),
     ("-1s", float("inf")), ("0", 0.0), ("1.5h", 5400.0), ("300ms", 0.3)],
)
def test_keep_alive_as_ollama_reads_it(value, seconds) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [("300", 'time: missing unit in duration "300"'), ("5x", 'time: invalid duration "5x"'), ("", 'time: invalid duration ""'),
     (True, "Unsupported type"), ([1], "Unsupported type")],
)
def test_bad_keep_alive_is_refused_with_gos_message(value, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        keep_alive_seconds(value)


def test_clair_decides_keep_alive_and_num_ctx() -> None:
    cfg = dataclasses.replace(Config(), keep_alive="30m", chat_num_ctx=4096)
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    cases = [
        ({}, "30m", 4096),
        ({"keep_alive": -1}, "30m", 4096),
        ({"keep_alive": "2h"}, "30m", 4096),
        ({"keep_alive": "10m"}, "10m", 4096),
        ({"keep_alive": 0}, 0, 4096),
        ({"options": {"num_ctx": 131072, "temperature": 0.1}}, "30m", 4096),
        ({"options": {"num_ctx": 1024}}, "30m", 4096),  # replaced, not capped: one runner shape
    ]
    for extra, keep, ctx in cases:
        out = decide({**base, **extra}, cfg, "test")
        assert out["keep_alive"] == keep and out["options"]["num_ctx"] == ctx, extra
        assert out["messages"] == base["messages"]
    assert decide({**base, "options": {"temperature": 0.1}}, cfg, "t")["options"]["temperature"] == 0.1
    assert decide({**base, "options": "bad"}, cfg, "t")["options"] == "bad"  # Ollama refuses it, before loading
    # Embeddings: a smaller context is kept (the model's own may be shorter), a larger one capped.
    embed = {"model": "e", "input": "x"}
    assert decide({**embed, "options": {"num_ctx": 512}}, cfg, "t", cap_only=True)["options"]["num_ctx"] == 512
    assert decide({**embed, "options": {"num_ctx": 65536}}, cfg, "t", cap_only=True)["options"]["num_ctx"] == 4096
    assert decide(embed, cfg, "t", cap_only=True)["options"]["num_ctx"] == 4096


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="0123456789.+-hmsuµμn", max_size=12),
        st.from_regex(r"[+-]{0,2}(\d{0,3}(\.\d{0,2})?(h|m|s|ms|us|µs|ns|x)?){0,3}", fullmatch=True),
        st.integers(-10**6, 10**6),
        st.floats(-1e6, 1e6, allow_nan=False),
        st.none(),
    )
)
def test_keep_alive_parsing_agrees_with_the_stand_ins_go_faithful_parser(value) -> None:
    """Two independent readings of Ollama's keep_alive: Clair refuses exactly what Ollama refuses."""
    from tests.ollama_standin import keep_alive_from_json

    try:
        expected = keep_alive_from_json(value)
    except ValueError:
        with pytest.raises(ValueError):
            keep_alive_seconds(value)
        return
    got = keep_alive_seconds(value)
    assert got == pytest.approx(expected) if expected is not None else got is None
