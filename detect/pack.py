"""The built-in rule pack shipped with sandtrace."""

from __future__ import annotations

from pathlib import Path

from api.resources import shipped


def builtin_rules() -> Path:
    """The directory of the built-in Sigma rules (their test cases in tests/ below it)."""
    return shipped(__file__, "rules")
