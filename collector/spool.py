"""The collector's disk spool: sealed batches waiting for the detection service.

One file per batch, named so that a directory listing sorts in sequence order:
    <seq:020d>-<events>-<carried>.batch
where `carried` is the number of earlier discards the batch's own LostEvent reports (so that a
batch discarded in turn hands those back to be reported again). A batch is written to a
temporary file and renamed, so a crash leaves either the whole batch or nothing.

The spool is bounded in bytes: to make room, the oldest batches are discarded (an attacker
who floods the spool pushes out their own noise, not what comes after it), and every event
discarded is counted by the caller. A write that fails (disk full, I/O error) is the caller's
to count too; the spool itself stays consistent and takes writes again when space returns.

The directory also keeps the collector's identity across restarts: `collector.id`, and
`seq.lease`, a sequence number above every one this collector has used (leased in blocks,
so that it is written once per LEASE batches, not per batch). A restarted collector replays
its spool under the same id and continues above the lease, so the service's replay
recognition stays correct.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import re
import secrets
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path

LEASE = 10_000
_NAME = re.compile(r"^(\d{20})-(\d+)-(\d+)\.batch$")


@dataclass(frozen=True, slots=True)
class Spooled:
    seq: int
    events: int
    carried: int
    size: int
    path: Path


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("spool size must be positive")
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = _lock(directory)
        self._files: deque[Spooled] = deque()
        self.bytes = 0
        found: list[Spooled] = []
        for entry in directory.iterdir():
            if entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)  # a write cut short by a crash
                continue
            m = _NAME.match(entry.name)
            if m is None:
                continue
            seq, events, carried = (int(g) for g in m.groups())
            found.append(Spooled(seq, events, carried, entry.stat().st_size, entry))
        for item in sorted(found, key=lambda s: s.seq):
            self._files.append(item)
            self.bytes += item.size
        self.collector_id = self._identity()
        self._lease_end = self._read_lease()
        self.next_seq = max(self._lease_end, self._files[-1].seq + 1 if self._files else 0)
        self._renew_lease()

    def close(self) -> None:
        """Let another collector use the directory (the batches stay for it)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    # -- identity and sequence numbers -------------------------------------------------------

    def _identity(self) -> str:
        path = self.directory / "collector.id"
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text
        ident = f"{socket.gethostname()}/{secrets.token_hex(4)}"
        self._write_atomic(path, ident.encode() + b"\n")
        return ident

    def _read_lease(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            return int((self.directory / "seq.lease").read_text().strip())
        return 0

    def _renew_lease(self) -> None:
        self._lease_end = self.next_seq + LEASE
        self._write_atomic(self.directory / "seq.lease", f"{self._lease_end}\n".encode())

    def take_seq(self) -> int:
        """The next sequence number; never one used before, also across restarts."""
        seq = self.next_seq
        self.next_seq += 1
        if self.next_seq >= self._lease_end:
            with contextlib.suppress(OSError):  # a full disk: retried at the next seq
                self._renew_lease()
        return seq

    # -- batches ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._files)

    @property
    def events(self) -> int:
        """The events the spooled batches hold (each batch's own LostEvent not counted)."""
        return sum(f.events - (1 if f.carried else 0) for f in self._files)

    def put(
        self, seq: int, events: int, carried: int, body: bytes, keep: int | None = None
    ) -> list[Spooled]:
        """Store a batch; returns the batches discarded to make room (oldest first, never
        the one with sequence `keep`: it is on its way to the service). Raises OSError when
        the write fails; the spool is unchanged then."""
        if len(body) > self.max_bytes:
            raise OSError(f"batch of {len(body)} bytes is larger than the whole spool")
        discarded: list[Spooled] = []
        while self.bytes + len(body) > self.max_bytes:
            index = 1 if self._files and self._files[0].seq == keep else 0
            if index >= len(self._files):
                raise OSError("no room in the spool beside the batch being sent")
            discarded.append(self._drop(index))
        path = self.directory / f"{seq:020d}-{events}-{carried}.batch"
        self._write_atomic(path, body)
        item = Spooled(seq, events, carried, len(body), path)
        if self._files and self._files[-1].seq > seq:  # older than some spooled (at exit)
            self._files.insert(bisect.bisect([f.seq for f in self._files], seq), item)
        else:
            self._files.append(item)
        self.bytes += len(body)
        return discarded

    def head(self) -> tuple[Spooled, bytes] | None:
        """The oldest batch and its bytes; an unreadable file is dropped and reported as
        discarded by raising SpoolCorrupt."""
        if not self._files:
            return None
        item = self._files[0]
        try:
            return item, item.path.read_bytes()
        except OSError as exc:
            self._drop_head()
            raise SpoolCorrupt(item, str(exc)) from None

    def pop(self, seq: int) -> None:
        """Forget the batch with this sequence number (the service acknowledged it)."""
        for index, item in enumerate(self._files):
            if item.seq == seq:
                self._drop(index)
                return

    def _drop_head(self) -> Spooled:
        return self._drop(0)

    def _drop(self, index: int) -> Spooled:
        item = self._files[index]
        del self._files[index]
        self.bytes -= item.size
        with contextlib.suppress(OSError):  # left behind, it is a replay the service skips
            item.path.unlink(missing_ok=True)
        return item

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


class SpoolBusy(OSError):
    """Another collector holds the spool directory."""


def _lock(directory: Path) -> int:
    """An exclusive lock on the directory for this collector's life: two collectors on one
    spool would replay each other's batches under one id."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolBusy(
            f"spool directory {directory} is in use by another collector: "
            "give this one its own --spool-dir"
        ) from None
    return fd


class SpoolCorrupt(Exception):
    def __init__(self, item: Spooled, reason: str) -> None:
        super().__init__(f"spooled batch {item.path.name} unreadable: {reason}")
        self.item = item
