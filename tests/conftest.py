"""Shared test settings (CPU only, offline, quiet) and fixtures."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WSAE_PROFILE", "ci")


@pytest.fixture
def capture_calls(monkeypatch):
    """Counts the calls of ``activations.capture_residuals`` (one per batch of contexts that the
    model runs) from here on, each passed through to the real one: ``capture_calls["n"]``; assign 0
    to count afresh."""
    from wsae_core import activations as A

    calls = {"n": 0}
    real = A.capture_residuals

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(A, "capture_residuals", counting)
    return calls
