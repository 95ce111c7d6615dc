"""A TCP listener on 127.0.0.1 that the test itself runs: the ground truth of how many
connects a traced command made to it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Listener:
    port: int
    peers: list[str] = field(default_factory=list)  # "ip:port" of every connect accepted


@contextlib.contextmanager
def loopback_listener() -> Iterator[Listener]:
    """Listen on a port the kernel chooses, accept and close every connect until the end."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    listener = Listener(server.getsockname()[1])
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            listener.peers.append(f"{peer[0]}:{peer[1]}")
            conn.close()

    thread = threading.Thread(target=accept, name="loopback-listener", daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()
