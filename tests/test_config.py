"""Settings: defaults < environment < flags, demo mode, validation messages, Ollama's host rules, generated docs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clair.base import config
from clair.base.config import Config, env_example, env_name, load, markdown_table, ollama_url, parse_keep_alive
from clair.base.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ALL_ENV_NAMES = [env_name(f) for f in config.fields()]


def test_every_setting_has_an_env_name_and_help() -> None:
    assert "OLLAMA_HOST" in ALL_ENV_NAMES
    assert "CLAIR_PORT" in ALL_ENV_NAMES
    assert "CLAIR_OLLAMA_HOST" not in ALL_ENV_NAMES  # Ollama's own variable, not a CLAIR_ copy
    assert len(set(ALL_ENV_NAMES)) == len(ALL_ENV_NAMES)
    for f in config.fields():
        assert f.metadata["help"].strip(), f.name


def test_defaults() -> None:
    cfg = load([], environ={})
    assert cfg == Config()
    assert (cfg.host, cfg.port, cfg.demo) == ("127.0.0.1", 7860, False)
    assert cfg.image_model == "SG161222/RealVisXL_V5.0"
    assert cfg.local_chat_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (cfg.gpu_policy, cfg.chat_backend, cfg.pinned_offload) == ("budget", "auto", "auto")
    assert cfg.chat_num_ctx == 4096
    assert cfg.keep_alive_value == "30m"
    assert cfg.ollama_url == "http://127.0.0.1:11434"
    assert cfg.vram_budget_gb == 0.0


def test_environment_overrides_defaults_with_types() -> None:
    cfg = load(
        [],
        environ={
            "CLAIR_PORT": "8000",
            "CLAIR_GPU_POLICY": "EXCLUSIVE",  # choices are case-insensitive, normalised to the canonical spelling
            "CLAIR_WARMUP": "0",
            "CLAIR_VRAM_BUDGET_GB": "20.5",
            "CLAIR_IMAGE_MODEL": "/models/realvis",
            "CLAIR_HOST": "",  # empty means "not set"
            "UNRELATED": "x",
        },
    )
    assert cfg.port == 8000 and isinstance(cfg.port, int)
    assert cfg.gpu_policy == "exclusive"
    assert cfg.warmup is False
    assert cfg.vram_budget_gb == 20.5 and isinstance(cfg.vram_budget_gb, float)
    assert cfg.image_model == "/models/realvis"
    assert cfg.host == "127.0.0.1"


def test_flags_override_environment() -> None:
    env = {"CLAIR_PORT": "8000", "CLAIR_GPU_POLICY": "exclusive", "CLAIR_HOST": "10.0.0.2"}
    cfg = load(["--port", "9000", "--gpu-policy", "budget"], environ=env)
    assert cfg.port == 9000
    assert cfg.gpu_policy == "budget"
    assert cfg.host == "10.0.0.2"  # not given as a flag: the environment still counts


def test_reads_os_environ_when_no_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAIR_PORT", "8123")
    assert load([]).port == 8123


def test_demo_switches_models_to_tiny() -> None:
    cfg = load(["--demo"], environ={})
    assert cfg.demo is True
    assert (cfg.image_model, cfg.local_chat_model) == ("tiny", "tiny")
    assert load([], environ={"CLAIR_DEMO": "1"}).image_model == "tiny"


def test_demo_keeps_explicitly_given_models() -> None:
    cfg = load(["--demo", "--image-model", "/models/sdxl"], environ={})
    assert (cfg.image_model, cfg.local_chat_model) == ("/models/sdxl", "tiny")
    cfg = load(["--demo"], environ={"CLAIR_LOCAL_CHAT_MODEL": "/models/qwen"})
    assert (cfg.image_model, cfg.local_chat_model) == ("tiny", "/models/qwen")


@pytest.mark.parametrize(
    ("env", "name", "detail"),
    [
        ({"CLAIR_PORT": "abc"}, "CLAIR_PORT", "int"),
        ({"CLAIR_PORT": "70000"}, "CLAIR_PORT", "port"),
        ({"CLAIR_GPU_POLICY": "bogus"}, "CLAIR_GPU_POLICY", "budget, exclusive"),
        ({"CLAIR_CHAT_NUM_CTX": "10"}, "CLAIR_CHAT_NUM_CTX", "256"),
        ({"CLAIR_KEEP_ALIVE": "5 minutes"}, "CLAIR_KEEP_ALIVE", "30m"),
        ({"CLAIR_WARMUP": "maybe"}, "CLAIR_WARMUP", "bool"),
        ({"CLAIR_VRAM_BUDGET_GB": "-1"}, "CLAIR_VRAM_BUDGET_GB", "GB"),
        ({"CLAIR_SESSION_HOURS": "0"}, "CLAIR_SESSION_HOURS", "positive"),
        ({"CLAIR_TLS_CERT": "/nonexistent.pem"}, "CLAIR_TLS_KEY", "both"),
        ({"CLAIR_MAX_CONNECTIONS": "2"}, "CLAIR_MAX_CONNECTIONS", "at least 8"),
        ({"CLAIR_MAX_QUEUE": "0"}, "CLAIR_MAX_QUEUE", "at least 1"),
        ({"CLAIR_MAX_QUEUE": "513"}, "CLAIR_MAX_QUEUE", "512 or less"),
        ({"CLAIR_MAX_SIDE": "1001"}, "CLAIR_MAX_SIDE", "multiple of 8"),
        ({"CLAIR_MAX_GUIDANCE": "-1"}, "CLAIR_MIN_GUIDANCE", "min <= max"),
        ({"CLAIR_MAX_PROMPT_CHARS": "0"}, "CLAIR_MAX_PROMPT_CHARS", "at least 1"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], name: str, detail: str) -> None:
    with pytest.raises(ConfigError) as err:
        load([], environ=env)
    message = str(err.value)
    assert name in message
    assert detail in message
    assert "\n" not in message


def test_bad_flag_value_is_reported_with_the_variable_name() -> None:
    with pytest.raises(ConfigError, match="CLAIR_PORT"):
        load(["--port", "http"], environ={})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("300", 300),  # Ollama's API rejects the unit-less string "300": send a number
        ("30m", "30m"),
        ("1h30m", "1h30m"),
        ("-1", -1),  # forever
        ("0", 0),  # unload when idle
        (" 5m ", "5m"),
    ],
)
def test_keep_alive_value(raw: str, expected: str | int) -> None:
    value = load([], environ={"CLAIR_KEEP_ALIVE": raw}).keep_alive_value
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("raw", ["5 minutes", "m", "30x", "abc", "1.5"])
def test_keep_alive_rejects_non_durations(raw: str) -> None:
    with pytest.raises(ConfigError, match="CLAIR_KEEP_ALIVE"):
        parse_keep_alive(raw)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("http://host", "http://host:80"),  # a scheme without a port means the scheme's port, as in Ollama
        ("0.0.0.0", "http://127.0.0.1:11434"),  # a bind address, not a destination
        ("0.0.0.0:12345", "http://127.0.0.1:12345"),
        ("https://x.example", "https://x.example:443"),
        ("[::1]:1234", "http://[::1]:1234"),
        ("gpu-box", "http://gpu-box:11434"),
        ("", "http://127.0.0.1:11434"),
        ("http://host:8080/ollama/", "http://host:8080/ollama"),
    ],
)
def test_ollama_url(host: str, url: str) -> None:
    assert ollama_url(host) == url


def test_ollama_host_is_read_from_the_environment_as_ollama_does() -> None:
    cfg = load([], environ={"OLLAMA_HOST": "gpu-box:11500"})
    assert cfg.ollama_host == "gpu-box:11500"
    assert cfg.ollama_url == "http://gpu-box:11500"
    # The CLAIR_-prefixed spelling is not a thing: only Ollama's own variable is read, and the other is refused
    # with the name to use instead of being ignored.
    with pytest.raises(ConfigError, match=r"CLAIR_OLLAMA_HOST is not one of Clair's settings\. Did you mean OLLAMA_HOST"):
        load([], environ={"CLAIR_OLLAMA_HOST": "elsewhere:1"})


@pytest.mark.parametrize(
    ("name", "meant"),
    [("CLAIR_MAX_JOB_PER_USER", "CLAIR_MAX_JOBS_PER_USER"), ("CLAIR_CHATMODEL", "CLAIR_CHAT_MODEL"),
     ("CLAIR_VRAM_BUDGET", "CLAIR_VRAM_BUDGET_GB")],
)
def test_a_misspelled_setting_is_refused_with_the_name_meant(name: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} is not one of Clair's settings. Did you mean {meant}\\?"):
        load([], environ={name: "2"})


@pytest.mark.parametrize(
    ("name", "meant"),
    [("clair_preempt", "CLAIR_PREEMPT"), ("Clair_Max_Queue", "CLAIR_MAX_QUEUE"), ("CLAIR_preempt", "CLAIR_PREEMPT"),
     ("clair_max_job_per_user", "CLAIR_MAX_JOBS_PER_USER")],
)
def test_a_setting_in_the_wrong_case_is_refused_with_the_name_clair_reads(name: str, meant: str) -> None:
    """Environment names are case-sensitive (systemd, Docker Compose): `clair_preempt=always` was ignored
    silently and Clair ran on the default."""
    with pytest.raises(ConfigError, match=f"{name} is not one of Clair's settings: .*case-sensitive.* Did you mean {meant}\\?"):
        load([], environ={name: "always"})
    with pytest.raises(ConfigError, match=r"clair_zzz is not one of Clair's settings: .*upper-case"):
        load([], environ={"clair_zzz": "1"})


@pytest.mark.parametrize("name", ["clair_auth", "Clair_Auth", "CLAIR_auth"])
def test_clair_auth_in_the_wrong_case_is_named_and_its_retirement_explained(name: str) -> None:
    """CLAIR_AUTH is no setting but a retired name: in the wrong case it got the generic "all upper-case"
    message, which named no variable. It is named, with what replaced it; the value is never repeated."""
    with pytest.raises(ConfigError) as err:
        load([], environ={name: "alice:hunter2"})
    text = str(err.value)
    assert text.startswith(f"{name} is not one of Clair's settings") and "You meant CLAIR_AUTH" in text
    assert "adduser" in text and "hunter2" not in text
    with pytest.raises(ConfigError, match="Did you mean CLAIR_UPDATE_SCREENSHOTS"):
        load([], environ={"clair_update_screenshots": "1"})


def test_an_unknown_setting_far_from_any_name_is_refused_without_a_guess() -> None:
    with pytest.raises(ConfigError) as err:
        load([], environ={"CLAIR_ZZZ": "1"})
    assert "CLAIR_ZZZ is not one of Clair's settings" in str(err.value) and "Did you mean" not in str(err.value)
    assert load([], environ={"CLAIR_UPDATE_SCREENSHOTS": "1", "CLAIRVOYANT": "x"}) == Config()  # not settings


def test_generated_docs_list_every_variable() -> None:
    table, example = markdown_table(), env_example()
    for name in ALL_ENV_NAMES:
        assert f"`{name}`" in table, name
        assert f"#{name}=" in example, name
    assert "OLLAMA_HOST" in table and "#OLLAMA_HOST=127.0.0.1:11434" in example
    # The table has one row per setting (plus header and rule).
    assert len(table.strip().splitlines()) == len(ALL_ENV_NAMES) + 2


def test_env_example_defaults_load_back_to_the_defaults() -> None:
    """Uncommenting every line of the generated example must give exactly the default config."""
    environ = {}
    for line in env_example().splitlines():
        if line.startswith("#") and "=" in line and line[1:].split("=", 1)[0] in ALL_ENV_NAMES:
            key, value = line[1:].split("=", 1)
            environ[key] = value
    assert set(environ) == set(ALL_ENV_NAMES)
    assert load([], environ=environ) == Config()


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAIR_") and k != "OLLAMA_HOST"}
    env["COLUMNS"] = "100"
    return env


def test_app_help_lists_every_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "app.py", "--help"], cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for name in ALL_ENV_NAMES:
        assert name in proc.stdout, name
    assert "--demo" in proc.stdout and "--gpu-policy" in proc.stdout


@pytest.mark.parametrize(
    ("env", "name"),
    [({"CLAIR_PORT": "abc"}, "CLAIR_PORT"), ({"CLAIR_KEEP_ALIVE": "5 minutes"}, "CLAIR_KEEP_ALIVE")],
)
def test_app_exits_2_with_one_line_on_bad_setting(env: dict[str, str], name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env={**_clean_env(), **env}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert name in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_config_is_immutable_and_replaceable() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    assert dataclasses.replace(cfg, keep_alive="300").keep_alive_value == 300


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--auth", "me:secret"], {}), (["--auth=me:secret"], {}), ([], {"CLAIR_AUTH": "me:secret"})],
)
def test_auth_is_retired_with_a_pointer_to_adduser(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        load(argv, environ=env)
    assert "python app.py adduser NAME" in str(err.value)
    assert "secret" not in str(err.value)


def test_app_refuses_auth_flag_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "app.py", "--auth", "me:secret"], cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "adduser NAME" in proc.stderr and "Traceback" not in proc.stderr


def test_listen_serves_every_interface() -> None:
    assert load(["--listen"], environ={}).host == "0.0.0.0"
    assert load([], environ={"CLAIR_LISTEN": "1"}).host == "0.0.0.0"
    assert not load(["--listen"], environ={}).loopback_only
    assert load([], environ={}).loopback_only
    with pytest.raises(ConfigError, match="one or the other"):
        load(["--listen", "--host", "192.168.1.5"], environ={})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("fe80::1", False), ("box.lan", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert config.is_loopback(host) is loopback


def test_users_file_defaults_beside_the_outputs(tmp_path: Path) -> None:
    assert load([], environ={"CLAIR_OUTPUT_DIR": "/var/lib/clair/outputs"}).users_path == "/var/lib/clair/users.json"
    given = load(["--users-file", str(tmp_path / "u.json")], environ={}).users_path
    assert given == str(tmp_path / "u.json")


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    cfg = load([], environ={"CLAIR_TLS_CERT": str(cert), "CLAIR_TLS_KEY": str(key)})
    assert (cfg.tls_cert, cfg.tls_key) == (str(cert), str(key))
    with pytest.raises(ConfigError, match="CLAIR_TLS_KEY="):
        load([], environ={"CLAIR_TLS_CERT": str(cert), "CLAIR_TLS_KEY": str(tmp_path / "missing.pem")})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("CLAIR_QUEUE_TIMEOUT_S", "nan"),
        ("CLAIR_QUEUE_TIMEOUT_S", "inf"),
        ("CLAIR_QUEUE_TIMEOUT_S", "-5"),
        ("CLAIR_WARMUP_DELAY_S", "-1"),
        ("CLAIR_WARMUP_DELAY_S", "-inf"),
        ("CLAIR_EVICT_TIMEOUT_S", "0"),
        ("CLAIR_OLLAMA_TIMEOUT_S", "NaN"),
        ("CLAIR_VRAM_RESERVE_GB", "-0.5"),
        ("CLAIR_VRAM_BUDGET_GB", "nan"),
        ("CLAIR_MAX_NEW_TOKENS", "0"),
        ("CLAIR_GALLERY_SIZE", "-3"),
        ("CLAIR_STALL_S", "-1"),
        ("CLAIR_STALL_S", "nan"),
        ("CLAIR_MAX_STEPS", "100000"),
    ],
)
def test_numbers_out_of_range_are_refused_at_start_up(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        load([], environ={name: raw})
    message = str(err.value)
    assert name in message and "\n" not in message
    assert "range" in message or "at least" in message or "GB" in message


def test_every_number_declares_its_range_and_the_defaults_are_inside() -> None:
    for f in config.fields():
        if f.type in ("int", "float"):
            lo, hi = f.metadata["min"], f.metadata["max"]
            assert lo is not None and hi is not None, f.name
            assert lo <= f.default <= hi, f.name
    config.validate(Config())


def test_stall_must_outlast_a_healthy_eviction_and_ollama_silence() -> None:
    with pytest.raises(ConfigError, match="CLAIR_STALL_S=100 is too short"):
        load([], environ={"CLAIR_STALL_S": "100"})  # < 2 x 60 s of eviction
    assert load([], environ={"CLAIR_STALL_S": "0"}).stall_s == 0  # off
    cfg = load([], environ={"CLAIR_STALL_S": "90", "CLAIR_EVICT_TIMEOUT_S": "20", "CLAIR_OLLAMA_TIMEOUT_S": "60"})
    assert cfg.stall_s == 90


def test_demo_mode_saves_into_a_folder_of_its_own() -> None:
    demo = load(["--demo"], environ={})
    assert demo.output_dir == os.path.join("outputs", "demo")
    real = load([], environ={})
    # The users file stays where it always was; the demo's conversations are kept apart from real ones.
    assert demo.users_path == real.users_path
    assert demo.chats_dir != real.chats_dir and os.path.dirname(demo.chats_dir) == os.path.dirname(real.chats_dir)
    assert load(["--demo"], environ={"CLAIR_OUTPUT_DIR": "/srv/pics"}).output_dir == "/srv/pics"
    assert load(["--demo", "--output-dir", "mine"], environ={}).output_dir == "mine"


def test_help_speaks_plainly() -> None:
    text = config.parser().format_help() + "\n".join(f.metadata["help"] for f in config.fields())
    assert "default: ]" not in text and "default: )" not in text
    assert "seed's behaviour" not in text
    assert "vram_reserve_gb" not in text  # users know the variable, CLAIR_VRAM_RESERVE_GB
