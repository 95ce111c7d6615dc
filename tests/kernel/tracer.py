"""Test harness: real probes in the running kernel, real processes in real sandbox cgroups.

One Probes object is loaded per test session; each test gets sandboxes of its own (a new
cgroup with its own scope index), so tests never see each other's events.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from api.events import AnyEvent, LostEvent
from collector import cgroups
from collector.assemble import Assembler, Scope
from collector.pipeline import EscapeFollower
from probes.loader import Probes

PYTHON = "/usr/bin/python3"


class Tracer:
    def __init__(self, probes: Probes, root: Path) -> None:
        self.probes = probes
        self.root = root
        self.resolver = cgroups.CgroupResolver(root)
        self.assembler = Assembler([], self.resolver.path_of, cgroups.container_id_from_path)
        self.events: list[AnyEvent] = []
        self.follower = EscapeFollower(probes, root)
        self.decode_errors: list[str] = []
        probes.start(lambda: None)

    def collect(self) -> None:
        events, errors = self.assembler.feed_batches(self.probes.queue.drain())
        for event in events:
            self.follower.emit(event)
        self.events.extend(events)
        self.decode_errors.extend(errors)
        self.events.extend(self.assembler.expire())

    def wait_for(
        self, pred: Callable[[list[AnyEvent]], bool], timeout: float = 10.0
    ) -> list[AnyEvent]:
        deadline = time.monotonic() + timeout
        while True:
            self.collect()
            if pred(self.events):
                return self.events
            if time.monotonic() > deadline:
                raise AssertionError(f"events did not arrive within {timeout}s")
            time.sleep(0.02)

    @contextlib.contextmanager
    def sandbox(self) -> Iterator[Sandbox]:
        sb = cgroups.create_sandbox(self.root)
        index = len(self.assembler.scopes)
        rel = "/" + str(sb.path.relative_to(self.root))
        self.assembler.scopes.append(Scope(sb.name, [rel]))
        try:
            self.probes.trace_cgroup(sb.path, index)
            yield Sandbox(self, sb)
        finally:
            try:
                self.probes.detach_cgroup(sb.path)
            finally:
                sb.destroy()


class Sandbox:
    def __init__(self, tracer: Tracer, cgroup: cgroups.SandboxCgroup) -> None:
        self.tracer = tracer
        self.cgroup = cgroup
        self.name = cgroup.name

    def spawn(self, argv: Sequence[str | bytes], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, preexec_fn=self.cgroup.join, **kw)  # noqa: PLW1509

    def run(
        self, argv: Sequence[str | bytes], timeout: float = 30.0, **kw: Any
    ) -> tuple[int, bytes, list[AnyEvent]]:
        """Run argv in the sandbox; return its pid, stdout and this sandbox's events, once the
        exit event of argv's process has arrived."""
        proc = self.spawn(argv, stdout=subprocess.PIPE, **kw)
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{argv!r} failed with {proc.returncode}: {out!r}"
        self.wait_exit(proc.pid)
        return proc.pid, out, self.events()

    def python(self, code: str, *args: str) -> tuple[int, bytes, list[AnyEvent]]:
        return self.run([PYTHON, "-c", code, *args])

    def wait_exit(self, pid: int) -> None:
        self.tracer.wait_for(
            lambda evs: any(
                not isinstance(e, LostEvent) and e.kind == "exit" and e.process.pid == pid
                for e in evs
            )
        )
        # Every record written before the exit record has been read by now; a TCP connect
        # may still wait for its outcome.
        self.tracer.collect()

    def events(self) -> list[AnyEvent]:
        return [e for e in self.tracer.events if getattr(e, "sandbox", None) == self.name]


def of(events: list[AnyEvent], kind: str, pid: int | None = None) -> list[Any]:
    return [
        e
        for e in events
        if e.kind == kind
        and (pid is None or (not isinstance(e, LostEvent) and e.process.pid == pid))
    ]


def one(events: list[AnyEvent], kind: str, pid: int | None = None) -> Any:
    found = of(events, kind, pid)
    assert len(found) == 1, f"expected one {kind} event for pid {pid}, got {found!r}"
    return found[0]


def startup_notes() -> set[str]:
    """The lines a sandtrace command prints first: this kernel's notes (probes.kernel)."""
    from probes import kernel  # noqa: PLC0415

    return {f"sandtrace: {note}" for note in kernel.check().notes}


def without_notes(stderr: str) -> list[str]:
    """The lines of a sandtrace command's stderr, the startup notes left out."""
    notes = startup_notes()
    return [line for line in stderr.splitlines() if line not in notes]


def first_line_after_notes(stream: Any) -> str:
    """The first line a sandtrace command writes to `stream` after its startup notes."""
    notes = startup_notes()
    while True:
        line: str = stream.readline()
        if line.rstrip("\n") not in notes:
            return line


def python_exe() -> bytes:
    return os.path.realpath(PYTHON).encode()


__all__ = [
    "PYTHON",
    "Sandbox",
    "Tracer",
    "first_line_after_notes",
    "of",
    "one",
    "python_exe",
    "sys",
    "without_notes",
]
