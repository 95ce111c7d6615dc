"""sandtrace's benchmarks: `python -m bench` (see bench/__main__.py)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collector import cgroups

Row = tuple[str, str, str, str]


def micro(exe: Path, *args: object, sandbox: cgroups.SandboxCgroup | None = None) -> float:
    """What bench/micro.c prints for `args` (ns per operation), run on the host or in `sandbox`."""
    out = subprocess.run(
        [str(exe), *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=sandbox.join if sandbox else None,
    ).stdout
    return float(out)


def print_table(rows: list[Row]) -> None:
    """The results as a Markdown table: measure, without, with, ratio or note."""
    print(f"| {'measure':<42} | {'without':>9} | {'with':>9} | {'ratio / note':<26} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 11}|{'-' * 28}|")
    for name, without, with_, note in rows:
        print(f"| {name:<42} | {without:>9} | {with_:>9} | {note:<26} |")


def standalone(
    module: str,
    title: str,
    rows: Callable[[cgroups.SandboxCgroup], list[Row]],
    argv: list[str] | None = None,
) -> int:
    """Run one benchmark module alone (`python -m bench.MODULE`, its arguments `argv`): as
    root, in a sandbox of its own (and its parent, when this made it, removed after), then
    its table with the command that made it."""
    from collector import cgroups  # noqa: PLC0415 - only when run alone

    if os.geteuid() != 0:
        print("bench: needs root (loads eBPF programs)", file=sys.stderr)
        return 2
    root = cgroups.find_cgroup2_root()
    parent_existed = (root / "sandtrace").exists()
    sandbox = cgroups.create_sandbox(root)
    try:
        table = rows(sandbox)
    finally:
        sandbox.destroy()
        if not parent_existed:
            cgroups.remove_parent_if_unused(root)
    cmd = shlex.join(["sudo", ".venv/bin/python", "-m", module, *(argv or sys.argv[1:])])
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"\nsandtrace {title} benchmark, {os.cpu_count()} CPUs, {when}")
    print(f"command: {cmd}\n")
    print_table(table)
    return 0
