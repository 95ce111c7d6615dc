"""A real `sandtrace serve` process for tests: started, waited for, stopped (also on failure).

with serving(["--token-file", str(tok)]) as svc:
    svc.url, svc.port, svc.log()  # its stderr so far
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Serving:
    proc: subprocess.Popen[str]
    port: int
    url: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, and its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=timeout)
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start_serve(
    args: list[str],
    port: int | None = None,
    scheme: str = "http",
    env: dict[str, str] | None = None,
) -> Serving:
    """Start serve on 127.0.0.1:port (a free one by default) and wait until it serves; env
    adds to the environment."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandtrace", "serve", "--listen", f"127.0.0.1:{port}", *args],
        cwd=ROOT_DIR,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    svc = Serving(proc, port, f"{scheme}://127.0.0.1:{port}")
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        if not line:
            proc.wait(timeout=20)
            proc.stderr.close()
            raise AssertionError(f"serve exited before serving:\n{svc.log()}")
        svc.lines.append(line)
        if "serving on" in line:
            break

    def drain() -> None:  # keep reading so that serve never blocks on a full pipe
        assert proc.stderr is not None
        for rest in proc.stderr:
            svc.lines.append(rest)

    svc.reader = threading.Thread(target=drain, daemon=True)
    svc.reader.start()
    return svc


@contextlib.contextmanager
def serving(args: list[str], port: int | None = None, scheme: str = "http") -> Iterator[Serving]:
    svc = start_serve(args, port, scheme)
    try:
        yield svc
    finally:
        svc.kill()
