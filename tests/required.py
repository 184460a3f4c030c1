"""Optional test dependencies that ``make test`` requires.

Outside ``make test`` a test whose dependency is missing skips (a contributor may install only the
core). Under ``make test`` (``WSAE_REQUIRE_TEST_EXTRA`` set) a missing dependency is an error, so the
suite never passes by skipping what it was meant to check.
"""

from __future__ import annotations

import importlib
import os

import pytest


def missing(reason: str, *, allow_module_level: bool = False, env: str = "WSAE_REQUIRE_TEST_EXTRA"):
    """Skip with ``reason``, or fail with it where ``env`` says the dependency is required."""
    if os.environ.get(env):
        raise RuntimeError(f"{env} is set but a required test dependency is missing: {reason}")
    pytest.skip(reason, allow_module_level=allow_module_level)


def require(module: str, install: str = "make setup", *, env: str = "WSAE_REQUIRE_TEST_EXTRA"):
    """``importorskip`` that fails instead of skipping where ``env`` is set; returns the module."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing(f"{module} not installed ({install}): {err}", allow_module_level=True, env=env)
