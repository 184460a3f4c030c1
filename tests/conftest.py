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


@pytest.fixture
def mock_cpu(monkeypatch):
    """``mock_cpu(caps, speedup=None)``: the CPU's capability flags are exactly ``caps`` and the bf16
    matmul measurement returns ``speedup``; a measurement that the flags should not have asked for
    (``speedup`` None) fails the test."""
    from wsae_core import models

    def set_(caps, speedup=None):
        monkeypatch.setattr(models, "cpu_capabilities", lambda: dict(caps))

        def measured():
            if speedup is None:
                raise AssertionError("the matmul measurement must not run for these capabilities")
            return speedup

        monkeypatch.setattr(models, "bf16_matmul_speedup", measured)

    return set_
