"""Running the real `sandtrace` entry point from e2e tests and reading what it wrote: one
subprocess helper for any command, and `record` for the common shape, a `sandtrace run`
with --events and --alerts whose JSON lines the test then reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detect.loader import load_paths

ROOT_DIR = Path(__file__).resolve().parents[2]
EVENTS, ALERTS = "events.jsonl", "alerts.jsonl"  # the files `record` writes in its directory
_PACK = load_paths([ROOT_DIR / "rules"])
RULE_FILE = {r.id: Path(r.source).stem for r in _PACK.rules} | {
    c.id: Path(c.source).stem for c in _PACK.correlations
}  # a built-in rule's id -> the stem of its file (the "theme" tests ask for)


def sandtrace_cli(
    *argv: str, cwd: Path = ROOT_DIR, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m sandtrace ARGV` run to its end, both streams captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=timeout,
        check=False,
    )


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; none if the file was never written."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class Run:
    """What a `sandtrace run` left: its exit status, stderr and the two JSON-lines files."""

    returncode: int
    stderr: str
    events: list[dict[str, Any]]
    alerts: list[dict[str, Any]]

    def themes(self) -> set[str]:
        return {RULE_FILE.get(a["rule_id"], a["rule_id"]) for a in self.alerts}

    def alerts_of(self, theme: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts if RULE_FILE.get(a["rule_id"], a["rule_id"]) == theme]

    def pids(self, exe_suffix: str) -> set[int]:
        return {
            e["process"]["pid"]
            for e in self.events
            if e["kind"] == "exec" and e["process"]["exe"].endswith(exe_suffix)
        }


def record(work: Path, *argv: str, background: Callable[[], object] | None = None) -> Run:
    """`sandtrace run --events work/EVENTS --alerts work/ALERTS ARGV` (ARGV: options, then
    `--` and the command) in `work`, stdout discarded; `background` is called while it runs
    (to act from outside the sandbox). Killed if it has not ended within two minutes."""
    events, alerts = work / EVENTS, work / ALERTS
    argv = ("run", "--events", str(events), "--alerts", str(alerts), *argv)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandtrace", *argv],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if background is not None:
            background()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Run(proc.returncode, stderr, json_lines(events), json_lines(alerts))
