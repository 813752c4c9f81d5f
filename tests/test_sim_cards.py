"""Several simulated cards (CLAIR_SIM_GPU_GB=12,24): the setting, one state file per card, the device-level list
of cards and their readings; and a single size still behaves exactly as one card did."""

from __future__ import annotations

import os

import pytest

from clair.arbiter.placement import Card, Held, Request, ollama_cards_from, place
from clair.base import config
from clair.base.errors import ConfigError
from clair.device import card as device
from clair.device import simcard
from clair.device.simcard import GiB, SimCard


def test_a_list_of_sizes_is_several_cards():
    cfg = config.load([], {"CLAIR_SIM_GPU_GB": "12, 24"})
    assert cfg.sim_gpu_sizes == (12.0, 24.0)
    assert cfg.sim_gpu_gb == 12.0  # what the single-card code reads: the first card


@pytest.mark.parametrize("raw,want_gb,want", [("20", 20.0, (20.0,)), ("0", 0.0, ()), ("", 0.0, ())])
def test_a_single_size_is_as_before(raw, want_gb, want):
    cfg = config.load([], {"CLAIR_SIM_GPU_GB": raw})
    assert (cfg.sim_gpu_gb, cfg.sim_gpu_cards, cfg.sim_gpu_sizes) == (want_gb, (), want)


def test_demo_still_gets_its_one_card():
    assert config.load(["--demo"], {}).sim_gpu_sizes == (20.0,)


@pytest.mark.parametrize("raw", ["12,x", "12,0", "12,,24", "12,nan", "12,5000", "12,-1"])
def test_a_bad_list_says_what_to_write(raw):
    with pytest.raises(ConfigError, match=r"CLAIR_SIM_GPU_GB=.*12,24 is two cards"):
        config.load([], {"CLAIR_SIM_GPU_GB": raw})


def test_the_list_is_no_setting_of_its_own():
    names = {config.env_name(f) for f in config.fields()}
    assert "CLAIR_SIM_GPU_CARDS" not in names
    assert "SIM_GPU_CARDS" not in config.markdown_table() and "SIM_GPU_CARDS" not in config.env_example()
    with pytest.raises(ConfigError, match="not one of Clair's settings"):
        config.load([], {"CLAIR_SIM_GPU_CARDS": "12,24"})


def test_two_cards_one_file_each(tmp_path):
    path = str(tmp_path / "sim-gpu.json")
    cards = simcard.configure_cards((12, 24), path)
    try:
        assert len(cards) == 2 and device.cards() == cards
        assert device.current() is cards[0]  # today's single-card code runs on card 0
        assert [c.path for c in cards] == [path, str(tmp_path / "sim-gpu-1.json")]
        assert [r.total for r in device.readings()] == [12 * GiB, 24 * GiB]
        assert [r.free for r in device.readings()] == [12 * GiB, 24 * GiB]

        # Memory taken on card 1 (by another process, as Ollama's runner does) shows on card 1 only.
        assert simcard.take(cards[1].path, "ollama:1:runner", 5 * GiB)
        free = [r.free for r in device.readings()]
        assert free == [12 * GiB, 19 * GiB]

        # And a model on card 0 takes card 0's memory only.
        cards[0].hold("unet", 2 * GiB)
        r0, r1 = device.readings()
        assert r0.free < 10 * GiB and r1.free == 19 * GiB
    finally:
        for c in cards:
            c.close()


def test_another_process_sees_the_same_cards(tmp_path):
    path = str(tmp_path / "sim-gpu.json")
    cards = simcard.configure_cards((12, 24), path)
    try:
        cards[1].hold("unet", 3 * GiB)
        # A second holder (a worker, a stand-in) opening card 1's file reads what the first one holds.
        other = SimCard(simcard.card_path(path, 1), total=24 * GiB, holder="worker:0:1")
        assert other.reading().free == cards[1].reading().free < 21 * GiB
    finally:
        for c in cards:
            c.close()


def test_one_size_is_one_card_and_one_file(tmp_path):
    path = str(tmp_path / "sim-gpu.json")
    cards = simcard.configure_cards((20,), path)
    try:
        assert device.cards() == cards == [device.current()]
        assert isinstance(cards[0], SimCard) and cards[0].path == path and cards[0].total == 20 * GiB
        assert sorted(os.listdir(tmp_path)) == ["sim-gpu.json"]
        # configure() with the same file keeps the same card, as before.
        assert simcard.configure(20, path) is cards[0]
    finally:
        cards[0].close()


def test_no_simulated_card_lists_the_detected_device(tmp_path):
    assert simcard.configure_cards((), str(tmp_path / "sim.json")) == device.cards() == [device.current()]
    assert not os.listdir(tmp_path)


def test_install_forgets_the_other_cards(tmp_path):
    cards = simcard.configure_cards((12, 24), str(tmp_path / "sim.json"))
    device.install(None)
    assert len(device.cards()) == 1 and device.cards()[0] is not cards[1]


def test_placement_on_read_cards(tmp_path):
    """The readings of two simulated cards, as placement sees them: chat's model on the 12 GB card, a render
    goes to the 24 GB card and evicts nothing."""
    path = str(tmp_path / "sim-gpu.json")
    cards = simcard.configure_cards((12, 24), path)
    try:
        cards[0].hold("local-chat", int(1.5 * GiB))
        budget = [r.total - int(1.5 * GiB) for r in device.readings()]  # CLAIR_VRAM_RESERVE_GB's margin
        seen = [
            Card(0, budget[0], (Held("local-chat", cards[0].reading().reserved),)),
            Card(1, budget[1], ()),
        ]
        p = place(seen, Request("render", "image", 11 * GiB))
        assert (p.card, p.evict) == (1, ())
    finally:
        for c in cards:
            c.close()


def test_ollamas_card_from_what_its_runner_holds(tmp_path):
    """Without CLAIR_OLLAMA_GPUS, Ollama's card is the one its runner holds memory on (the stand-in names its
    holders ollama:<pid>:...), and a render that cannot fit beside it elsewhere evicts it only there."""
    path = str(tmp_path / "sim-gpu.json")
    cards = simcard.configure_cards((12, 24), path)
    try:
        assert simcard.take(cards[1].path, f"ollama:{os.getpid()}:runner-1:llama3.1:8b", 6 * GiB)
        assert simcard.take(cards[0].path, f"blender:{os.getpid()}", 4 * GiB)
        held = [simcard.held_by(c.path, "ollama") for c in cards]
        assert held == [0, 6 * GiB]
        mine = ollama_cards_from("", held)
        assert mine == frozenset({1})

        seen = [
            Card(
                i,
                c.reading().total,
                tuple(
                    Held(k.split(":", 1)[0], v, fixed=not k.startswith("ollama"))
                    for k, v in simcard.read(c.path)["procs"].items()
                ),
            )
            for i, c in enumerate(cards)
        ]
        p = place(seen, Request("render", "image", 20 * GiB), mine)
        assert (p.card, p.evict) == (1, ("ollama",))
        # Told Ollama uses card 0 only, Clair leaves its memory on card 1 alone: nowhere to put 20 GiB.
        assert place(seen, Request("render", "image", 20 * GiB), ollama_cards_from("0", held)).card is None
    finally:
        for c in cards:
            c.close()
