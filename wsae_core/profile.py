"""Run sizes: the one switch between the test build, the book build and paper-scale runs.

Every chapter sizes its experiments with :func:`pick`, so the same notebook runs in seconds under
``make test`` (``WSAE_PROFILE=ci``), at the book's default size under ``make book``
(``WSAE_PROFILE=book``, the default) and at the paper's size where the hardware exists
(``WSAE_PROFILE=paper``). Cells whose printed numbers nbval compares must not depend on the
profile (see CONTRIBUTING.md).
"""

from __future__ import annotations

import os
from typing import Literal, TypeVar

Profile = Literal["ci", "book", "paper"]
PROFILES: tuple[str, ...] = ("ci", "book", "paper")
ENV_VAR = "WSAE_PROFILE"
DEFAULT: Profile = "book"

T = TypeVar("T")


def current_profile() -> Profile:
    """The active profile, read from the ``WSAE_PROFILE`` environment variable (default ``book``)."""
    value = os.environ.get(ENV_VAR, DEFAULT).strip().lower() or DEFAULT
    if value not in PROFILES:
        raise ValueError(
            f"{ENV_VAR} must be one of {', '.join(PROFILES)}, got {os.environ.get(ENV_VAR)!r}"
        )
    return value  # type: ignore[return-value]


def pick(*, ci: T, book: T, paper: T | None = None, profile: Profile | None = None) -> T:
    """Choose a value by profile: ``pick(ci=1_000, book=100_000, paper=10_000_000)``.

    ``paper`` defaults to ``book`` when not given. ``profile`` overrides the environment.
    """
    chosen = current_profile() if profile is None else profile
    if chosen not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {chosen!r}")
    if chosen == "ci":
        return ci
    if chosen == "paper" and paper is not None:
        return paper
    return book
