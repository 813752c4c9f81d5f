"""The Ollama engine's pieces: one name per model, conservative sizes, the state file, other programs' memory."""

from __future__ import annotations

import dataclasses
import json

import pytest

from clair.base.config import Config
from clair.device import gpu
from clair.engines.base import StateFile
from clair.engines.chat import estimate_loaded_bytes, model_key, model_name
from clair.service.studio import Studio
from tests.ollama_standin import GB, LOADED_SIZES, OllamaStandin, loaded_size_bytes

GiB = 1024**3


@pytest.mark.parametrize(
    ("given", "listed"),
    [
        ("phi4", "phi4:latest"),
        ("phi4:latest", "phi4:latest"),
        ("llama3.1:8b", "llama3.1:8b"),
        ("library/phi4", "phi4:latest"),
        ("registry.ollama.ai/library/phi4:14b", "phi4:14b"),
        ("jmorgan/model", "jmorgan/model:latest"),
        ("registry.ollama.ai/jmorgan/model:q4", "jmorgan/model:q4"),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:latest"),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
        ("myhost:5000/team/model", "myhost:5000/team/model:latest"),  # a port is not a tag
        ("phi4@sha256:abc", "phi4:latest"),
        ("https://registry.ollama.ai/library/phi4", "phi4:latest"),
        ("  phi4  ", "phi4:latest"),
    ],
)
def test_model_names_are_normalised_as_ollama_lists_them(given, listed):
    assert model_name(given) == listed


def test_names_compare_case_insensitively():
    assert model_key("Phi4") == model_key("phi4:LATEST") == "phi4:latest"
    assert model_key("phi4:14b") != model_key("phi4")


@pytest.mark.parametrize(
    ("name", "disk_gb", "num_ctx"),
    [
        ("llama3.1:8b", 4.9, 4096),
        ("llama3.1:8b", 4.9, 32768),
        ("llama3:8b", 4.7, 2048),
        ("llama3.2:3b", 3.4, 16384),
        ("llama3.2:3b", 3.4, 32768),
        ("qwen2.5:0.5b", 0.4, 4096),
        ("gemma2:2b", 1.6, 8192),
        ("mistral:latest", 4.1, 4096),
        ("phi4:latest", 9.1, 4096),
    ],
)
def test_the_estimate_before_a_first_load_is_an_upper_bound_of_real_sizes(name, disk_gb, num_ctx):
    """Against the stand-in's table of `ollama ps` figures users reported (its own data, not our formula)."""
    assert name in LOADED_SIZES
    real = loaded_size_bytes(name, int(disk_gb * GB), num_ctx)
    est = estimate_loaded_bytes(int(disk_gb * GB), num_ctx)
    assert real <= est <= 1.6 * real + GiB, (real / GiB, est / GiB)  # above, but not absurdly


def test_state_file_survives_restarts_and_is_written_atomically(tmp_path):
    path = tmp_path / "state" / "clair-state.json"
    s = StateFile(path)
    s.put("ollama_loaded_bytes", "phi4:latest@4096", 11_000_000_000)
    assert json.loads(path.read_text()) == {"ollama_loaded_bytes": {"phi4:latest@4096": 11_000_000_000}}
    assert StateFile(path).get("ollama_loaded_bytes", "phi4:latest@4096") == 11_000_000_000
    assert [p.name for p in path.parent.iterdir()] == ["clair-state.json"]  # no temporary file left
    path.write_text("{not json")
    assert StateFile(path).get("ollama_loaded_bytes", "phi4:latest@4096") is None  # unreadable: start afresh


def test_the_state_file_is_never_inside_the_served_outputs(tmp_path):
    cfg = dataclasses.replace(Config(), output_dir=str(tmp_path / "outputs"))
    assert cfg.state_path == str(tmp_path / "clair-state.json")
    cfg = dataclasses.replace(cfg, state_dir=str(tmp_path / "var"))
    assert cfg.state_path == str(tmp_path / "var" / "clair-state.json")


@pytest.fixture
def standin():
    s = OllamaStandin({"llama3.1:8b": 4.9}, unload_delay=0.05).start()
    yield s
    s.stop()


def test_memory_held_by_other_programs_is_a_tenant_that_shrinks_the_budget(standin, tmp_path, monkeypatch):
    """On a card (the simulated one: the same device interface as CUDA): device used - what this process holds
    - what Ollama holds = other programs' memory."""
    from clair.device import simcard

    card = str(tmp_path / "card.json")
    asked = []
    monkeypatch.setattr(gpu, "wait_free", lambda n, timeout, **kw: asked.append(n))
    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(tmp_path / "out"),
        vram_budget_gb=22,
        sim_gpu_gb=24,
        sim_gpu_file=card,
    )
    studio = Studio(cfg)
    assert simcard.take(card, "other:1", 4 * GiB)  # another program
    studio.sync()
    st = studio.status()
    # 4 GiB used, none of it ours or Ollama's; 0.5 GiB is allowed for our own CUDA context.
    assert st["other_gb"] == 3.5
    assert [r for r in st["resident"] if r["other"]] == [
        {"tenant": "other", "gb": 3.5, "bytes": int(3.5 * 2**30), "busy": False, "evicting": False, "other": True, "unknown": False}
    ]
    # A render of 15.5 GiB no longer fits beside a 6 GiB chat model (22 - 3.5 = 18.5 GiB left).
    studio.arbiter.set_resident("ollama", 6 * GiB)
    assert simcard.take(card, "ollama:1", 6 * GiB)  # the 6 GiB are Ollama's: "other" stays 3.5 GiB
    monkeypatch.setattr(studio.ollama, "held_vram", lambda: 6 * GiB)
    studio._sync_other()
    assert studio.status()["other_gb"] == 3.5
    with studio.arbiter.lease("render", "image", int(15.5 * GiB)) as lease:
        assert lease.evicted == ("ollama",)
    assert asked == [int(15.5 * GiB)]  # and it waited for the memory to be free on the device
    # They let go: the entry leaves the ledger.
    simcard.give_back(card, "other:1")
    simcard.give_back(card, "ollama:1")
    monkeypatch.setattr(studio.ollama, "held_vram", lambda: 0)
    studio._sync_other()
    assert studio.status()["other_gb"] == 0.0
