"""The CUDA allocator setting: Clair's default is in the environment before torch is imported, and a
user's own setting (under either of PyTorch's names) is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clair.device import allocator

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, os, sys
import clair.main as m
seen = {}
def serve(cfg):
    seen.update({k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")})
    seen["torch_imported"] = "torch" in sys.modules
m.serve = serve
m.main(["--port", "7999"])
print(json.dumps(seen))
"""


def run_main(env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in allocator.VARS}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_start_up_sets_expandable_segments_before_torch_is_imported() -> None:
    seen = run_main({})
    assert seen == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": None,
                    "torch_imported": False}  # fmt: skip


@pytest.mark.parametrize("name", allocator.VARS)
def test_a_users_own_allocator_setting_wins(name: str) -> None:
    seen = run_main({name: "max_split_size_mb:512"})
    assert seen[name] == "max_split_size_mb:512"
    other = next(v for v in allocator.VARS if v != name)
    assert seen[other] is None  # nothing added beside it


def test_apply_on_a_mapping() -> None:
    env: dict[str, str] = {}
    assert allocator.apply(env) == ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert allocator.apply(env) == ("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    env = {"PYTORCH_CUDA_ALLOC_CONF": "  "}  # blank is not a setting
    allocator.apply(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
