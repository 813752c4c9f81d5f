"""bench/run.py runs end to end on CPU and writes the figures the performance goals are read from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_run_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--rounds", "1", "--scenarios", "mixed,mixed_nofit", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["arbiter_overhead_us"] > 0
    for policy in ("budget", "exclusive"):
        p = data["policies"][policy]
        for key in ("chat_ttft_p50_s", "chat_ttft_p95_s", "render_wait_p95_s", "swaps", "budget_exceeded"):
            assert key in p, key
        assert p["budget_exceeded"] == 0
        for scenario in p["scenarios"].values():
            assert scenario["errors"] == [] and scenario["chats"] == 3 and scenario["renders"] == 1
            assert scenario["device_oom"] == 0  # read from the simulated card's own file
            assert scenario["ollama_num_parallel"] == 1  # Ollama's default unless --ollama-parallel
            # Every chat has a place in Ollama's queue; the places count them all.
            places = scenario["chat_ttft_by_position"]
            assert sum(x["n"] for x in places.values()) == len(scenario["chat_samples"]) == 3
    # Exclusive evicts Ollama for the render even when both fit; budget does not.
    assert data["policies"]["budget"]["scenarios"]["mixed"]["swaps"] == 0
    assert data["policies"]["exclusive"]["scenarios"]["mixed"]["swaps"] >= 1
    assert data["policies"]["budget"]["scenarios"]["mixed_nofit"]["swaps"] >= 1
    assert Path(data["timeline_png"]).stat().st_size > 10_000


# Runs bench/run.py as if matplotlib were not installed (requirements.txt alone): `import matplotlib` fails.
WITHOUT_MATPLOTLIB = "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; " \
    "runpy.run_path(sys.argv[0], run_name='__main__')"  # fmt: skip


@pytest.mark.slow
def test_seed_card_without_matplotlib(tmp_path):
    """The seed card: on 20 GB with an 8B model of 6.2 GB loaded, 1024² renders leave the model alone with the
    fp16-safe VAE and evict it with the stock one. And the bench runs without matplotlib.

    Only the seed-card scenarios: test_bench_run_smoke runs mixed and mixed_nofit (under both policies, with the
    same checks), and test_the_timeline_without_matplotlib_is_a_note_not_a_failure checks what the bench says
    when it cannot draw them."""
    out = tmp_path / "bench.json"
    args = ["--rounds", "1", "--policies", "budget", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, "bench/run.py", *args, "--scenarios", "seed_card,seed_card_stock"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["timeline_png"] is None and not out.with_suffix(".png").exists()
    runs = data["policies"]["budget"]["scenarios"]
    fp16, stock = runs["seed_card"], runs["seed_card_stock"]
    for run in (fp16, stock):
        assert run["errors"] == [] and run["chats"] == 3 and run["renders"] == 1
        assert run["ollama_loaded_gb"] == pytest.approx(6.2e9 / 2**30, abs=0.01)  # the stand-in's table, via /api/ps
        assert run["budget_exceeded"] == 0
        assert run["device_oom"] == 0  # the simulated 20 GB card refused nothing
    assert data["goals"]["device_oom_zero"] is True
    assert fp16["vae"] == "fp16-fix" and fp16["declared_render_gb"] < 12
    assert fp16["swaps"] == 0 and fp16["ollama_loads"] == 1 and fp16["ollama_unloads"] == 0
    assert stock["vae"] == "stock" and stock["declared_render_gb"] > 15.5
    assert stock["swaps"] >= 1 and stock["ollama_unloads"] >= 1
    assert data["goals"]["seed_card_fp16_vae_no_eviction_no_reload"] is True


def test_the_timeline_without_matplotlib_is_a_note_not_a_failure(tmp_path, monkeypatch, capsys):
    """bench/run.py's timeline (the mixed scenarios' leases) when `import matplotlib` fails: a note, no file."""
    import runpy

    monkeypatch.setattr(sys, "path", list(sys.path))  # bench/run.py puts the checkout first
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    bench = runpy.run_path(str(ROOT / "bench" / "run.py"), run_name="bench_run")
    png = tmp_path / "timeline.png"
    assert bench["draw_timeline"]({"budget": {"scenarios": {}}}, png) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not png.exists()
