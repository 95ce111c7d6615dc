"""sandtrace's benchmarks: `python -m bench` (see bench/__main__.py)."""

from __future__ import annotations

Row = tuple[str, str, str, str]


def print_table(rows: list[Row]) -> None:
    """The results as a Markdown table: measure, without, with, ratio or note."""
    print(f"| {'measure':<42} | {'without':>9} | {'with':>9} | {'ratio / note':<26} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 11}|{'-' * 28}|")
    for name, without, with_, note in rows:
        print(f"| {name:<42} | {without:>9} | {with_:>9} | {note:<26} |")
