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
    # Exclusive evicts Ollama for the render even when both fit; budget does not.
    assert data["policies"]["budget"]["scenarios"]["mixed"]["swaps"] == 0
    assert data["policies"]["exclusive"]["scenarios"]["mixed"]["swaps"] >= 1
    assert data["policies"]["budget"]["scenarios"]["mixed_nofit"]["swaps"] >= 1
    assert Path(data["timeline_png"]).stat().st_size > 10_000
