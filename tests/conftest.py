"""Suite-wide rules: the test layer follows from the directory, and kernel tests never skip.

Tests under tests/kernel are marked `kernel` and tests under tests/e2e `e2e`. When any
selected test carries either mark, the session stops at once with exit code 1 unless this
machine can run them: a kernel test that cannot run is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector import cgroups

TESTS_DIR = Path(__file__).resolve().parent
LAYER_DIRS = {"kernel": TESTS_DIR / "kernel", "e2e": TESTS_DIR / "e2e"}
TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")
FIX = "run the whole suite as root with `sudo make test`, which installs and mounts what is missing"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark, directory in LAYER_DIRS.items():
            if item.path.is_relative_to(directory):
                item.add_marker(mark)


@pytest.fixture(scope="session", autouse=True)
def sandbox_parent_left_as_found() -> Iterator[None]:
    """The cgroup that sandboxes share is made by the first test that makes a sandbox and
    left in place by design (see collector.cgroups.create_sandbox). At the session's end,
    whatever the tests' outcome: sandboxes made during the session and left empty (a test
    or a process killed before its own clean-up) are removed, then the shared cgroup if the
    session (or another one running beside it) made it and nothing is left in it."""
    try:
        root: Path | None = cgroups.find_cgroup2_root()
    except cgroups.CgroupError:
        root = None
    started = time.time() - 0.1  # cgroupfs times come from a coarse clock, a tick behind
    existed = root is None or (root / "sandtrace").exists()
    yield
    if root is None or not (parent := root / "sandtrace").exists():
        return
    for sandbox in parent.glob("st-*"):
        with contextlib.suppress(OSError):  # in use (processes in it), or already gone
            if sandbox.stat().st_mtime >= started and not (sandbox / "cgroup.procs").read_text():
                sandbox.rmdir()
    with contextlib.suppress(OSError):
        if not existed or parent.stat().st_mtime >= started:
            cgroups.remove_parent_if_unused(root)


def kernel_test_problems() -> list[str]:
    """What keeps this machine from running kernel and e2e tests; empty when nothing does."""
    if os.geteuid() != 0:
        return ["not running as root"]  # the checks below need root to look
    problems = []
    try:
        importlib.import_module("bcc")
    except Exception as exc:  # BCC raises more than ImportError when libbcc is broken
        problems.append(
            f"`import bcc` failed ({type(exc).__name__}: {exc}); BCC comes from "
            "Debian's python3-bpfcc, seen through .venv's system site packages"
        )
    if not TRACEFS_EVENTS.is_dir():
        problems.append(f"tracefs is not mounted ({TRACEFS_EVENTS} is missing)")
    build = Path("/lib/modules") / platform.release() / "build"
    if not build.is_dir():
        problems.append(f"{build} is missing (BCC compiles against it)")
    return problems


def pytest_collection_finish(session: pytest.Session) -> None:
    layers = sorted({m for item in session.items for m in LAYER_DIRS if item.get_closest_marker(m)})
    if not layers:
        return
    problems = kernel_test_problems()
    if problems:
        pytest.exit(
            f"{' and '.join(layers)} tests cannot run here: {'; '.join(problems)}. Fix: {FIX}.",
            returncode=1,
        )
