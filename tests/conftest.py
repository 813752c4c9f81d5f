"""Fixtures shared by the model tests."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline even if huggingface_hub was imported before the test module, and no sockets at all.

    Proves that the model code paths (tiny models, saved folders) never reach for a hub.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def _no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


@pytest.fixture(autouse=True)
def _fresh_device():
    """Every test starts and ends on the detected device (CUDA or none): a simulated card a Studio installed
    (CLAIR_SIM_GPU_GB) must not carry over into the next test."""
    from clair.device import card as device

    device.install(None)
    yield
    device.install(None)
