"""compose.yaml and the Dockerfile, checked offline: no registry of images is reachable from the project's
machines, so neither is built or run here. What can be checked: the compose file's structure against what
docs/install.md promises (services, GPU reservations, the Open WebUI profile, volumes, ports, every CLAIR_
name a real setting), and the Dockerfile's instructions (hadolint, from requirements-dev.txt, plus Clair's own
expectations)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clair.base import config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def gpu_devices(service: dict) -> list:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_compose_runs_ollama_and_clair_on_the_nvidia_gpu(compose: dict) -> None:
    services = compose["services"]
    assert {"ollama", "clair", "open-webui"} <= set(services)
    for name in ("ollama", "clair"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
        devices = gpu_devices(services[name])
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    clair = services["clair"]
    assert clair["build"] == "." and "ollama" in clair["depends_on"]
    env = clair["environment"]
    assert env["OLLAMA_HOST"] == "http://ollama:11434"
    assert env["CLAIR_OLLAMA_SHARES_GPU"] == "yes"  # the other container uses the same card
    # Every CLAIR_ name in the file is a setting Clair knows (the same check Clair makes at start-up), and the
    # settings load: what the container would do with them.
    config.check_names({k: str(v) for k, v in env.items()})
    cfg = config.load([], environ={k: str(v) for k, v in env.items()})
    assert cfg.host == "0.0.0.0" and cfg.ollama_port == 11435 and cfg.ollama_on_this_gpu
    # Published on the host's loopback only: the LAN goes through a TLS proxy (docs/install.md).
    assert all(str(p).startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))


def test_compose_keeps_models_outputs_and_users_in_volumes(compose: dict) -> None:
    services = compose["services"]
    mounts = {m.split(":", 1)[1]: m.split(":", 1)[0] for m in services["clair"]["volumes"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder, setting in (("/data/outputs", "CLAIR_OUTPUT_DIR"), ("/data/state", "CLAIR_STATE_DIR"),
                            ("/data/huggingface", "HF_HOME")):
        assert folder in mounts, folder
        assert f"{setting}={folder}" in dockerfile, setting  # the image puts the data where the volumes are
    assert "/root/.ollama" in {m.split(":", 1)[1] for m in services["ollama"]["volumes"]}
    named = set(compose["volumes"])
    used = {m.split(":", 1)[0] for s in services.values() for m in s.get("volumes", [])}
    assert used <= named, used - named


def test_open_webui_is_under_a_profile_and_goes_through_clair(compose: dict) -> None:
    webui = compose["services"]["open-webui"]
    assert webui["profiles"] == ["webui"]
    env = webui["environment"]
    assert env["OPENAI_API_BASE_URL"] == env["IMAGES_OPENAI_API_BASE_URL"] == "http://clair:7860/v1"
    assert env["ENABLE_OLLAMA_API"] == "false"  # not straight to Ollama: around the traffic cop
    assert env["IMAGE_GENERATION_ENGINE"] == "openai" and env["ENABLE_IMAGE_GENERATION"] == "true"
    assert env["ENABLE_FORWARD_USER_INFO_HEADERS"] == "true"
    # ... and Clair believes those headers from Open WebUI's key only (clair/service/forwarded.py).
    assert compose["services"]["clair"]["environment"]["CLAIR_FORWARDED_USERS_FROM"] == "webui"
    # Clair answers only to its own names: the one Open WebUI uses must be allowed.
    assert "clair" in compose["services"]["clair"]["environment"]["CLAIR_ALLOWED_HOSTS"].split(",")


def test_the_dockerfile_installs_the_clair_command_as_a_non_root_user() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    instructions = [ln.split()[0] for ln in lines if ln.split()[0].isupper()]
    base = next(ln for ln in lines if ln.startswith("FROM "))
    assert ":" in base and not base.endswith(":latest"), base  # pinned
    assert any("pip install" in ln and "-r requirements.txt" in ln for ln in lines)
    assert any("pip install" in ln and "--no-deps ." in ln for ln in lines)  # the package itself: the `clair` command
    assert lines[-1] == 'CMD ["clair"]'
    user = next(ln for ln in lines if ln.startswith("USER "))
    assert not user.split()[1].startswith(("0", "root")), user
    assert "HEALTHCHECK" in instructions and "/healthz" in (ROOT / "Dockerfile").read_text()
    # Everything COPY names exists, and pyproject.toml's data files are among it.
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "outputs" in ignored


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -r requirements-dev.txt)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
