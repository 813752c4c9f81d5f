"""bench/gpu.py runs every path with --dry-run (tiny sizes, CPU) and refuses to run without CUDA otherwise.

The script is run as a subprocess, as a person would run it, with CUDA hidden so that the same paths run
on any machine, and the hub offline to prove nothing is fetched. Its real numbers come only from a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SDXL_GB = 6.94  # UNet 5.14 + text encoders 0.25 + 1.39 + VAE 0.17 (docs/facts.md)


def run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the bench chooses, as Clair does
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "bench/gpu.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def dry_run(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    # The VAE peaks start four child processes: their own test below.
    proc = run_bench("--dry-run", "--quick", "--skip-vae", "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("env", "bandwidth", "sdxl", "render_1024", "llm"):
        assert "error" not in results[name], (name, results[name])
    return results


def check_swaps(section: dict[str, Any]) -> None:
    assert section["bytes"] > 0 and section["tensors"] > 0 and section["pcie_bound_s"] > 0
    for mode in ("pinned", "pageable"):
        swaps = section[mode]
        for key in ("evict_s", "restore_s"):
            assert swaps[key] >= 0 and swaps[f"{key}_min"] <= swaps[key]
            assert len(swaps[f"{key}_runs"]) >= 2
        assert swaps["restore_ratio_to_pcie_bound"] is not None
        assert swaps["identical_after_swaps"] is True
    assert section["pinned"]["prepare_s"] >= 0
    assert section["pinned"]["pinned_active"] is False  # no CUDA: no pinned memory requested


def test_dry_run_exercises_every_section(tmp_path: Path) -> None:
    r = dry_run(tmp_path)
    assert r["dry_run"] is True and r["note"] == "dry-run: not meaningful"
    assert r["env"]["device"] == "cpu" and r["env"]["torch"]
    # Swaps are measured under the allocator Clair runs with (issue 14, defect 7).
    assert r["env"]["pytorch_cuda_alloc_conf"] == "expandable_segments:True"

    bw = r["bandwidth"]
    for case in ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable"):
        assert bw[f"{case}_gbs"] > 0 and bw[f"{case}_gbs_max"] >= bw[f"{case}_gbs"]
    assert bw["pinned"] is False

    sdxl = r["sdxl"]
    assert sdxl["source"] == "diffusers"
    assert set(sdxl["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert sdxl["full_size_bytes"] / 1e9 == pytest.approx(SDXL_GB, abs=0.01)  # the config dicts are SDXL's
    check_swaps(sdxl)

    render = r["render_1024"]
    assert render["render_s"] > 0 and render["unet_s"] > 0 and render["vae_decode_s"] > 0
    # One pause and resume through Clair's WeightSwap (a second host copy on CPU): the same latents.
    assert render["pause_resume"]["latents_identical"] is True
    assert render["pause_resume"]["yield_s"] > 0 and render["pause_resume"]["resume_s"] > 0
    for key in ("peak_allocated_gib", "peak_reserved_gib", "steps", "clair_prior_gib"):
        assert key in render

    llm = r["llm"]
    assert llm["source"] == "transformers" and llm["layers"] == 8  # --quick
    assert llm["full_size_bytes"] / 1e9 == pytest.approx(5.59, abs=0.01)  # embeddings 2.10 + 8 x 0.436 per layer
    check_swaps(llm)

    assert set(r["goals"]) == {
        "sdxl_restore_within_1_25x_pcie_bound",
        "sdxl_evict_under_50ms",
        "sdxl_weights_identical_after_swaps",
    }
    for goal in r["goals"].values():
        assert goal["result"].startswith("N/A"), goal  # a dry run passes or fails nothing


def test_standin_has_sdxl_byte_and_tensor_counts(tmp_path: Path) -> None:
    r = dry_run(tmp_path, "--standin")
    sdxl = r["sdxl"]
    assert sdxl["source"] == "standin" and sdxl["standin_reason"] == "--standin"
    assert sdxl["full_size_bytes"] / 1e9 == pytest.approx(SDXL_GB, abs=0.01)
    assert sdxl["bytes"] / 1e9 == pytest.approx(SDXL_GB / 1000, rel=0.02)  # dry-run: 1/1000 of the bytes
    assert sdxl["components"]["unet"]["tensors"] == 1680
    check_swaps(sdxl)
    assert "skipped" in r["render_1024"]
    assert r["vae_peaks"]["skipped"] == "--skip-vae"
    assert r["llm"]["source"] == "standin" and r["llm"]["tensors"] == 5 + 9 * 8
    check_swaps(r["llm"])


def test_without_cuda_exits_2_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_bench("--out", str(out))
    assert proc.returncode == 2
    assert "bench/gpu.py needs a CUDA GPU; " in proc.stderr
    assert "--dry-run" in proc.stderr
    assert not out.exists()


def test_vae_peaks_run_each_vae_and_allocator_setting_in_a_fresh_process(tmp_path: Path) -> None:
    out = tmp_path / "vae.json"
    proc = run_bench("--dry-run", "--quick", "--only-vae", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "sdxl" not in r and "llm" not in r  # --only-vae
    runs = r["vae_peaks"]["runs"]
    assert set(runs) == {"stock/default", "stock/expandable", "fp16/default", "fp16/expandable"}
    for name, run in runs.items():
        kind, alloc = name.split("/")
        assert "error" not in run, run
        assert run["vae_upcast_fp32"] is (kind == "stock")
        assert run["alloc_conf"] == f"expandable_segments:{alloc == 'expandable'}"
        # The child saw the setting in its own environment (the JSON it wrote says so).
        child = json.loads((tmp_path / f"vae.vae-{kind}-{alloc}.json").read_text())["render_1024"]
        assert child["alloc_conf"] == run["alloc_conf"]
        assert run["render_s"] > 0 and run["clair_prior_gib"] > 0


def test_bit_identity_calls_nan_equal_to_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause check compares bits: a NaN in both runs is the same result (torch.equal says it is not)."""
    import importlib.util

    import torch

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # restored after the test

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    a = torch.tensor([1.0, float("nan"), -0.0], dtype=torch.float16)
    assert not torch.equal(a, a.clone())
    assert bench.bit_identical(a, a.clone())
    assert not bench.bit_identical(a, torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float16))  # -0 vs 0
    assert not bench.bit_identical(a, a.float())
