"""sandtrace's benchmarks: `python -m bench` (see bench/__main__.py)."""

from __future__ import annotations

import subprocess
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
