"""The first ten minutes: mistakes answered at once (before torch and Gradio load), the README's scripting
example run as written against the demo, and `pip install .` giving a working `clair` command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_pip_install_gives_a_clair_command_that_serves_the_demo(tmp_path: Path) -> None:
    """`pip install .` into a fresh venv: the `clair` command, its --help, and `clair --demo` serving the page
    with its assets. The venv borrows this interpreter's packages through a .pth file (torch and Gradio are
    gigabytes; what is tested is Clair's own packaging), and the build uses no network (--no-build-isolation)."""
    import shutil
    import urllib.request

    from tests.support import free_port, wait_until

    src = tmp_path / "src"  # a copy: the build writes build/ beside pyproject.toml
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("clair", "assets"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    import site as site_mod

    (site / "borrowed.pth").write_text("\n".join(site_mod.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps"]
    proc = subprocess.run([*pip, "--no-build-isolation", str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    clair = venv / "bin" / "clair"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAIR_")}
    proc = subprocess.run([str(clair), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: clair") and "--demo" in proc.stdout and "CLAIR_MAX_QUEUE" in proc.stdout
    # The installed package is what runs, not this checkout.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import clair.adapters.ui as u; print(u.__file__); print(u.ASSETS)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    ).stdout.split()
    assert where[0].startswith(str(venv)) and where[1] == str(venv / "share" / "clair" / "assets"), where

    port = free_port()
    env |= {"CLAIR_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "clair.log").open("w")
    server = subprocess.Popen([str(clair), "--demo"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: server.poll() is not None or _http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=120)
        assert server.poll() is None, (tmp_path / "clair.log").read_text()[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as r:
            config = json.loads(r.read())
        page = json.dumps(config)
        assert "#clair-header" in page and "pngText" in page, "the page lacks Clair's CSS or drop.js"
        assert (tmp_path / "outputs" / "demo").is_dir()  # the demo's folder, under the working directory
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def readme_snippet() -> str:
    """The README's scripting example: its first Python block, as a newcomer copies it."""
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no Python example"
    return blocks[0]


def test_the_readme_fits_one_screen_and_says_what_a_newcomer_needs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 60, "the README's first screen grew: move details into docs/"
    for needed in (
        "clair --demo",  # the demo command
        "download.pytorch.org/whl/cpu",  # the CPU-torch hint beside it
        "What you will see",
        "https://ollama.com/download",  # how to get Ollama
        "pip install -r requirements-dev.txt && .venv/bin/python -m pytest",  # the test command
    ):
        assert needed in readme, needed
    for page in ("install", "tour", "scripting", "clients", "configuration"):
        assert f"(docs/{page}.md)" in readme and (ROOT / "docs" / f"{page}.md").is_file(), page


def test_the_readme_scripting_example_runs_against_the_demo_as_written(tmp_path: Path) -> None:
    from tests.support import App, free_port

    snippet = readme_snippet()
    assert "http://127.0.0.1:7860" in snippet
    app = App(tmp_path, {"OLLAMA_HOST": f"127.0.0.1:{free_port()}"}, args=("--demo",))  # no Ollama: the demo's own
    try:
        script = tmp_path / "snippet.py"
        script.write_text(snippet.replace("http://127.0.0.1:7860", app.url))  # only the port differs
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr + app.log.read_text()[-2000:]
        lines = proc.stdout.strip().splitlines()
        assert lines[0].strip(), "no reply printed"
        path, seed, seconds = lines[-1].rsplit(" ", 2)
        png = Path(path)
        # What the README promises: the PNG's path in the output folder (outputs/demo/ unless set).
        assert png.parent == (tmp_path / "outputs").resolve() and png.suffix == ".png", path
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert int(seed) >= 0 and float(seconds) > 0
    finally:
        app.stop()


def test_offline_without_a_model_clair_says_once_what_is_missing_and_a_chat_fails_at_once(tmp_path: Path) -> None:
    """No --demo, no network (the hub's address refuses connections), nothing in the Hugging Face cache, no
    Ollama: start-up says once what is missing and how to get it; a chat is refused with that reason without
    the hub client's retries (20-80 s of them, logged one by one, before this)."""
    import time

    from gradio_client.exceptions import AppError

    from tests.support import App, free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: as offline as it gets, without waiting
    env = {
        "HF_ENDPOINT": closed, "HF_HOME": str(tmp_path / "hf"), "OLLAMA_HOST": f"127.0.0.1:{free_port()}",
        "CLAIR_IMAGE_MODEL": "SG161222/RealVisXL_V5.0", "CLAIR_LOCAL_CHAT_MODEL": "Qwen/Qwen2.5-0.5B-Instruct",
    }
    env["HF_HUB_OFFLINE"] = ""  # not told it is offline (the tests' App says so by default)
    env["CLAIR_LOG_LEVEL"] = "DEBUG"  # the hub client's own retry messages stay in (Clair hides them otherwise)
    app = App(tmp_path, env)
    try:
        t0 = time.monotonic()
        with pytest.raises(AppError) as err:
            app.client.predict("hello?", [], api_name="/chat")
        took = time.monotonic() - t0
        assert "Qwen/Qwen2.5-0.5B-Instruct" in str(err.value), err.value
        log = app.log.read_text()
        said = [ln for ln in log.splitlines() if "cannot be reached, so Clair loads models from the Hugging Face" in ln]
        assert len(said) == 1, log[-3000:]
        assert "Qwen/Qwen2.5-0.5B-Instruct" in said[0] and "SG161222/RealVisXL_V5.0" in said[0]
        assert "huggingface-cli download" in said[0] and "ollama.com/download" in said[0]
        assert "Retrying in" not in log, log[-3000:]  # not one retry of the hub
        loud = [ln for ln in log.splitlines() if " WARNING " in ln or " ERROR " in ln]
        assert len(loud) <= 4, "\n".join(loud)  # the missing models once, the chat refused, no CUDA: not 160 lines
        print(f"chat refused in {took:.2f} s")  # a figure, not a limit (this machine is shared)
    finally:
        app.stop()
