"""The first ten minutes: mistakes answered at once (before torch and Gradio load), the README's scripting
example run as written against the demo, and `pip install .` giving a working `clair` command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "gradio", "diffusers", "transformers", "uvicorn")

# Runs Clair's main() as `python app.py ARGS` would, then reports its exit status and which heavy modules
# were imported by then: a refusal must come before any of them loads (they take tens of seconds).
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from clair.main import main
rc = main(sys.argv[2:])
print(json.dumps({"rc": rc, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def start(args: list[str], env: dict[str, str], cwd: Path) -> tuple[dict, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLAIR_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), *args], cwd=cwd, env={**base, **env},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_listen_without_users_is_refused_before_anything_heavy_loads(tmp_path: Path) -> None:
    result, err = start(["--listen", "--port", "1"], {"CLAIR_USERS_FILE": str(tmp_path / "users.json")}, tmp_path)
    assert result == {"rc": 2, "heavy": []}, err
    assert "without users" in err and "adduser NAME" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_port_in_use_is_refused_at_once_with_the_flag_to_pick_another(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, err = start(["--demo", "--port", str(port)], {"CLAIR_OUTPUT_DIR": str(tmp_path / "out")}, tmp_path)
    assert result == {"rc": 2, "heavy": []}, err
    assert f"Port {port} on 127.0.0.1 is in use" in err and f"--port {port + 1}" in err, err
    assert "Traceback" not in err


def test_a_misspelled_setting_is_refused_at_once_with_a_guess(tmp_path: Path) -> None:
    result, err = start(["--demo"], {"CLAIR_MAX_JOB_PER_USER": "8"}, tmp_path)
    assert result == {"rc": 2, "heavy": []}, err
    assert "CLAIR_MAX_JOB_PER_USER is not one of Clair's settings. Did you mean CLAIR_MAX_JOBS_PER_USER?" in err
