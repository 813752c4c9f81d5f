"""The configuration table (docs/configuration.md) and the example env file are generated from clair/base/config.py:
keep them current."""

from pathlib import Path

from clair.base import config

ROOT = Path(__file__).resolve().parent.parent


def test_config_table_is_current():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert config.markdown_table() in page, "regenerate docs/configuration.md's table with `python -m clair.base.config`"


def test_env_example_is_current():
    example = (ROOT / "systemd" / "clair.env.example").read_text()
    assert example == config.env_example(), "regenerate with `python -m clair.base.config --env > systemd/clair.env.example`"


def test_the_docs_put_no_password_on_a_command_line():
    for page in ("README.md", "docs/install.md"):
        text = (ROOT / page).read_text()
        assert "--auth" not in text.replace("the old `--auth user:password` is gone", ""), page
    install = (ROOT / "docs" / "install.md").read_text()
    assert "clair adduser" in install and "clair --listen" in install


# Built from parts so that this file does not match itself.
OUTSIDE = ("shared" + "/reference", "../" + "shared/", "/" + "work/")


def test_nothing_cites_files_outside_the_repository():
    """Facts the code relies on are written in docs/ with their public sources (docs/facts.md); a path to a
    folder beside the checkout means nothing to anyone who clones the repository."""
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    offenders = []
    for name in filter(None, tracked):
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (images)
        for number, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in OUTSIDE):
                offenders.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not offenders, "cite docs/facts.md (with the public source) instead:\n" + "\n".join(offenders)


def test_facts_name_their_sources():
    facts = (ROOT / "docs" / "facts.md").read_text()
    for source in (
        "https://huggingface.co/madebyollin/sdxl-vae-fp16-fix",
        "https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf",
        "https://docs.ollama.com/faq",
        "https://github.com/ollama/ollama/blob/main/server/sched.go",
        "https://github.com/ollama/ollama/blob/main/docs/context-length.mdx",
        "bench/gpu.py",
    ):
        assert source in facts, source
