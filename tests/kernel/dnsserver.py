"""The test DNS server (tests/e2e/services/dns_server.py) on a loopback address, for the
kernel tests that resolve names (flows, enforcement)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DNS_SCRIPT = Path(__file__).resolve().parents[1] / "e2e" / "services" / "dns_server.py"


@contextmanager
def dns_server(zone: dict[str, Any], bind: str, workdir: Path) -> Iterator[Path]:
    """The server answering `zone` on bind:53 (UDP and TCP) until the block ends, once it
    accepts connections; the path of its query log (JSON lines)."""
    zone_file, log = workdir / "zone.json", workdir / "queries.jsonl"
    zone_file.write_text(json.dumps(zone))
    argv = [sys.executable, str(DNS_SCRIPT), "--bind", bind, "--zone", str(zone_file)]
    proc = subprocess.Popen([*argv, "--log", str(log)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((bind, 53), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no DNS server"
                time.sleep(0.05)
        yield log
    finally:
        proc.kill()
        proc.wait()
