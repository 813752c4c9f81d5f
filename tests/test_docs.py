"""The README's configuration table and the example env file are generated from clair/config.py: keep them current."""

from pathlib import Path

from clair import config

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config.markdown_table() in readme, "regenerate the README table with `python -m clair.config`"


def test_env_example_is_current():
    example = (ROOT / "systemd" / "clair.env.example").read_text()
    assert example == config.env_example(), "regenerate with `python -m clair.config --env > systemd/clair.env.example`"


def test_readme_puts_no_password_on_a_command_line():
    readme = (ROOT / "README.md").read_text()
    assert "--auth" not in readme.replace("the old `--auth user:password` is gone", "")
    assert "app.py adduser" in readme and "app.py --listen" in readme
