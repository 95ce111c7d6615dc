"""Where the data sandtrace ships with its code is: the probes' C sources (bpf/) and the
built-in rule pack (rules/).

Installed, they sit inside the package that reads them (the wheel maps the checkout's
top-level bpf/ to probes/bpf and rules/ to detect/rules); run from a checkout, they are the
checkout's top-level directories. One function finds either, so no other code guesses.
"""

from __future__ import annotations

from pathlib import Path


class MissingData(FileNotFoundError):
    """A data directory sandtrace needs is not where it was installed."""


def shipped(module_file: str, name: str) -> Path:
    """The directory `name` shipped with the package whose module is `module_file`."""
    package = Path(module_file).resolve().parent
    candidates = (package / name, package.parent / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise MissingData(
        f"sandtrace's {name}/ directory is in neither {candidates[0]} nor {candidates[1]}: "
        "reinstall sandtrace (pip install --force-reinstall sandtrace), or run from a checkout"
    )
