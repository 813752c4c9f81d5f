"""Past conversations on disk: per user, no cross-user reads, plain text only, within the limits."""

from __future__ import annotations

import dataclasses
import json

import pytest

from clair.base.config import Config
from clair.base.errors import BadRequest
from clair.service.conversations import ConversationStore, valid_id


@pytest.fixture
def store(tmp_path):
    cfg = dataclasses.replace(Config(), max_history_messages=6, max_history_chars=100)
    return ConversationStore(cfg, root=tmp_path / "chats", max_per_owner=3)


TALK = [
    {"role": "user", "content": "paint me a lighthouse"},
    {"role": "assistant", "content": "A red one, at dusk?"},
]


def test_saved_conversation_comes_back_after_a_restart(store, tmp_path):
    cid = store.save("ann", None, TALK)
    assert valid_id(cid)
    again = ConversationStore(store.cfg, root=tmp_path / "chats")  # a new process: only the files remain
    assert again.load("ann", cid) == TALK
    [summary] = again.list("ann")
    assert (summary.id, summary.title) == (cid, "paint me a lighthouse")
    # Saving under the same id replaces it.
    assert store.save("ann", cid, [*TALK, {"role": "user", "content": "yes"}]) == cid
    assert len(again.load("ann", cid)) == 3 and len(again.list("ann")) == 1


def test_users_never_see_each_others_conversations(store):
    ann = store.save("ann", None, TALK)
    bob = store.save("bob", None, [{"role": "user", "content": "bob's secret"}])
    house = store.save(None, None, [{"role": "user", "content": "household"}])
    assert [s.id for s in store.list("ann")] == [ann]
    assert [s.id for s in store.list("bob")] == [bob]
    assert [s.id for s in store.list(None)] == [house]
    assert store.load("bob", ann) is None and store.load("ann", bob) is None and store.load(None, ann) is None
    assert not store.delete("bob", ann)
    assert store.load("ann", ann) == TALK
    # Bob saving under Ann's id makes his own conversation; Ann's is untouched.
    store.save("bob", ann, [{"role": "user", "content": "overwrite?"}])
    assert store.load("ann", ann) == TALK
    # No user name becomes a path.
    weird = store.save("../../etc", None, TALK)
    assert all(p.parent.parent == store.root for p in store.root.rglob("*.json")), list(store.root.rglob("*"))
    assert store.load("../../etc", weird) == TALK


@pytest.mark.parametrize("bad", ["../x", "0123456789abcdeg", "0123456789ABCDEF", "", None, 5, ["a"], "a" * 16])
def test_ids_not_made_here_are_refused(store, bad):
    store.save("ann", None, TALK)
    assert store.load("ann", bad) is None
    assert not store.delete("ann", bad)


def test_only_plain_text_is_stored(store):
    cid = store.save(
        "ann",
        None,
        [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "⚠️ The GPU is busy"},  # Clair's notices are not kept
            {"role": "assistant", "content": "hi", "metadata": {"path": "/etc/passwd"}},
        ],
    )
    raw = json.loads((store.folder("ann") / f"{cid}.json").read_text())
    assert raw["messages"] == [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    assert "/etc/passwd" not in json.dumps(raw)
    for bad in (
        [{"role": "user", "content": {"path": "/etc/passwd"}}],
        [{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd"}}]}],
        ["just a string"],
        {"role": "user", "content": "not a list"},
        [{"role": "tool", "content": "x"}],
    ):
        with pytest.raises(BadRequest):
            store.save("ann", None, bad)
    assert len(store.list("ann")) == 1


def test_a_tampered_file_reads_back_as_plain_text_or_nothing(store):
    cid = store.save("ann", None, TALK)
    path = store.folder("ann") / f"{cid}.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": {"path": "/etc/passwd"}}]}))
    assert store.load("ann", cid) is None
    path.write_text("not json")
    assert store.load("ann", cid) is None and store.list("ann") == []


def test_limits_keep_the_newest_messages_and_conversations(store):
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(20)]
    cid = store.save("ann", None, long)
    assert [m["content"] for m in store.load("ann", cid)] == [f"m{i}" for i in range(14, 20)]  # 6 messages
    big = [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y" * 60}]
    assert store.load("ann", store.save("ann", None, big)) == [big[1]]  # 100 characters at most
    assert store.save("ann", None, [{"role": "user", "content": "⚠️ only a notice"}]) is None
    for i in range(5):
        store.save("ann", None, [{"role": "user", "content": f"chat {i}"}])
    titles = [s.title for s in store.list("ann")]
    assert len(titles) == 3 and "chat 4" in titles and "chat 0" not in titles
    assert len(list(store.folder("ann").glob("*.json"))) == 3
