"""JSON-lines output (a file rotated by size, or stdout), exactly once with the service's help.

Delivery is at least once for every other output: an item whose delivery failed midway is
sent again whole. A JSON-lines file is exactly once: the output notes where each batch's
items end (JsonlOutput.mark), the OutputGate makes the service wait for the file before it
acknowledges a batch and saves that point with its replay state, and take_back() cuts the
file back to it at the next start, so that lines of batches that were never acknowledged
(their collectors send them again) are not written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from api.events import Alert, AnyEvent
from service.outputs.base import Output, OutputSection, Pending, RetryableError, dumps
from service.schemas.common import Doc, Item

log = structlog.get_logger("sandtrace.outputs")

Point = tuple[int, int, int]  # a file's device, inode, and a size within it
# Where each output file's acknowledged lines end, by path, as the replay state keeps it
# ([device, inode, size]); None for a file that was behind.
Points = dict[str, list[int] | None]


class JsonlOutput(Output):
    """One JSON object per line, to a file (rotated by size) or to stdout (path "-").

    A file moved or removed by someone else (logrotate) is noticed at the next write, and the
    path is opened anew. Every write is of whole lines: a write that fails midway (disk full)
    is cut back to where it started, so a reader never sees a partial line, and is tried
    again later."""

    output_type = "jsonl"
    default_batch = 100

    def __init__(self, section: OutputSection, index: int) -> None:
        super().__init__(section, index)
        self.path: str = section["path"]
        self.max_bytes: int = section.get("max_bytes", 0)  # 0: never rotate
        self.backups: int = section.get("backups", 5)
        self._fd: int | None = None
        self._ident = (0, 0)  # the open file's device and inode
        self._size = 0
        # Batch marks (see mark()): items are numbered as they enter the queue
        self._accepted = 0  # items enqueued so far
        self._finished = 0  # of those, items written or dropped
        # [first ticket, last ticket, items before their end]: batches that brought this
        # output nothing share their predecessor's end, so a stuck output holds one entry
        self._marks: deque[list[int]] = deque()
        self.resolved = 0  # the last ticket whose items are all finished
        # (first ticket, last ticket, where their items end), oldest first
        self._points: deque[tuple[int, int, Point | None]] = deque()
        self.on_progress: Callable[[], None] = lambda: None

    # --- batch marks -----------------------------------------------------------------------

    def submit(self, item: Item) -> bool:
        if super().submit(item):
            self._accepted += 1
            return True
        return False

    def mark(self, ticket: int) -> None:
        """Note that everything of batch `ticket` has been submitted. Once the output has
        finished those items (and all before them), `resolved` reaches ticket and, for a
        file, point_at(ticket) says where in which file they end. The sender never writes
        past a mark in one go, so that the point is exact."""
        marks = self._marks
        if marks and marks[-1][2] == self._accepted:
            marks[-1][1] = ticket
        else:
            marks.append([ticket, ticket, self._accepted])
        self._resolve_marks()

    def _batch_limit(self) -> int:
        if self._marks:  # never past the next batch mark: see mark()
            return min(self.batch, self._marks[0][2] - self._finished)
        return self.batch

    def _batch_done(self, items: int) -> None:
        self._finished += items
        self._resolve_marks()
        self.on_progress()  # sent or dropped moved: whoever waits on them looks again

    def _resolve_marks(self) -> None:
        marks = self._marks
        while marks and marks[0][2] <= self._finished:
            first, last, _ = marks.popleft()
            self.resolved = last
            self._points.append((first, last, self.point()))

    def point_at(self, ticket: int) -> Point | None:
        """Where the items of batch `ticket` (and all before) end; None if not finished (or
        forgotten, or written to stdout)."""
        for first, last, point in reversed(self._points):
            if first <= ticket <= last:
                return point
            if last < ticket:
                break
        return None

    def point(self) -> Point | None:
        """Where this output's finished items end now: the file's device, inode and size;
        None for stdout."""
        if self.path == "-" or self._fd is None:
            return None
        return (*self._ident, self._size)

    @property
    def state_key(self) -> str | None:
        """How the replay state names this output's file (None: stdout, nothing to take
        back)."""
        return None if self.path == "-" else str(Path(self.path).resolve())

    def forget_points(self, below: int) -> None:
        points = self._points
        while points and points[0][1] < below:
            points.popleft()

    def take_back(self, point: Point) -> str | None:
        """Before the output opens: cut its file back to `point` (device, inode, size),
        where the items of the last acknowledged batch ended. Lines beyond it came from
        batches the service never acknowledged, which their collectors send again; keeping
        them would write those events and alerts twice. The file may have been rotated since
        (the point is then in a backup, and the newer files hold only lines to take back).
        Returns what was done, for the log; None when nothing was."""
        if self.path == "-":
            return None
        base = Path(self.path)
        files = [base, *(base.with_name(f"{base.name}.{i}") for i in range(1, self.backups + 1))]
        dev, ino, size = point
        for k, path in enumerate(files):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) != (dev, ino):
                continue
            if st.st_size < size:
                return f"{path} is shorter than when last acknowledged; left as it is"
            cut = st.st_size - size
            with path.open("r+b") as f:
                f.truncate(size)
            newer = sum(p.exists() for p in files[:k])
            for p in files[:k]:  # written after the point: nothing in them was acknowledged
                p.unlink(missing_ok=True)
            for i, p in enumerate(files[k:]):  # the point's file is the current one again
                if p.exists():
                    p.replace(files[i])
            if not cut and not newer:
                return None
            return (
                f"took back {cut} bytes"
                + (f" and {newer} newer files" if newer else "")
                + " written for batches never acknowledged; their collectors send them again"
            )
        return (
            f"the file of the last acknowledged batch is gone from {base} and its "
            f"backups; lines of unacknowledged batches may appear twice"
        )

    # --- writing ---------------------------------------------------------------------------

    def _payload(self, item: Item, doc: Doc) -> bytes:
        return (dumps(doc) + "\n").encode("ascii")

    async def _open(self) -> None:
        if self.path != "-":
            await asyncio.to_thread(self._open_file)

    def _open_file(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        st = os.fstat(self._fd)
        self._ident, self._size = (st.st_dev, st.st_ino), st.st_size

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        base = Path(self.path)
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = base.with_name(f"{base.name}.{i}")
                if older.exists():
                    older.replace(base.with_name(f"{base.name}.{i + 1}"))
            base.replace(base.with_name(f"{base.name}.1"))
        else:
            base.unlink(missing_ok=True)
        self._open_file()

    def _moved(self) -> bool:
        """Whether the path no longer names the file this output has open."""
        if self._fd is None:
            return False
        try:
            st = Path(self.path).stat()
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, f"{self.path} is not open")
        return self._fd

    def _write_all(self, fd: int, data: bytes, truncate_to: int | None) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            if truncate_to is not None:  # take back the part of the lines that got written
                os.ftruncate(fd, truncate_to)
            raise

    def _write(self, lines: list[bytes]) -> int:
        """Write lines, rotating as needed; the count written before an OSError is kept in
        the exception's args (the caller needs it to know what to send again)."""
        if self.path == "-":
            self._write_all(sys.stdout.fileno(), b"".join(lines), None)
            return len(lines)
        written = 0
        try:
            if self._fd is not None and self._moved():
                os.close(self._fd)  # logrotate (or a person) moved or removed the file
                self._fd = None
            if self._fd is None:
                self._open_file()
            while written < len(lines):
                chunk: list[bytes] = []
                size = self._size
                for line in lines[written:]:
                    if self.max_bytes and size + len(line) > self.max_bytes and (size or chunk):
                        break
                    chunk.append(line)
                    size += len(line)
                if not chunk:  # the file is full: start a new one
                    self._rotate()
                    continue
                self._write_all(self._fd_or_raise(), b"".join(chunk), self._size)
                self._size = size
                written += len(chunk)
        except OSError as exc:
            raise _PartialWrite(written, exc) from exc
        return written

    async def _deliver(self, pending: list[Pending]) -> list[Pending]:
        try:
            n = await asyncio.to_thread(self._write, [p.payload for p in pending])
        except _PartialWrite as exc:
            self.stats.sent += exc.written
            cause = errno.errorcode.get(exc.error.errno or 0, "OSError")
            raise RetryableError(cause, str(exc.error), rest=pending[exc.written :]) from exc
        self.stats.sent += n
        return []

    async def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _PartialWrite(Exception):
    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(written, error)
        self.written = written
        self.error = error


# --- the service's side: wait for the files, keep their points, take back at start ----------


class OutputGate:
    """Acknowledge a batch once the file outputs that keep up have written what it gave them.

    The service hands a batch's events and alerts to every output, then marks the batch's
    end on each JSON-lines output (JsonlOutput.mark) and, before acknowledging, waits until
    each has finished everything up to that mark. A file output that does not get there
    within `wait` seconds (a full disk) is not waited on again until it has caught up on its
    own, so it holds ingestion up for one `wait` at most. Network outputs (syslog, HEC,
    Elasticsearch) are not waited on: a round trip to a SIEM per batch would bound every
    collector's rate by the SIEM's latency. Their bounded queues, retries and drop counters
    account for their items.

    points() says where in each file the acknowledged batches end; the replay state keeps it
    so that a restarted service can take back lines of batches it never acknowledged
    (take_back), which keeps the files exactly once across a crash.
    """

    def __init__(self, outputs: Sequence[Output], wait: float = 1.0) -> None:
        self.all = list(outputs)
        self.outputs = [o for o in outputs if isinstance(o, JsonlOutput)]
        self.wait = wait
        self.lagging = [False] * len(self.outputs)
        self.progress = asyncio.Event()
        for out in self.outputs:
            out.on_progress = self.progress.set

    def __bool__(self) -> bool:
        return bool(self.outputs)

    def submit(self, item: Alert | AnyEvent) -> None:
        for out in self.all:
            out.submit(item)

    def end_batch(self, ticket: int) -> None:
        """Everything of batch `ticket` has been submitted."""
        for out in self.outputs:
            out.mark(ticket)

    async def settle(self, ticket: int) -> None:
        """Return once every output that keeps up has finished batch `ticket`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while True:
            self.progress.clear()  # before looking: progress made after this still wakes us
            behind = False
            for i, out in enumerate(self.outputs):
                if out.resolved >= ticket:
                    self.lagging[i] = False
                elif not self.lagging[i]:
                    behind = True
            if not behind:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                for i, out in enumerate(self.outputs):
                    if out.resolved < ticket and not self.lagging[i]:
                        self.lagging[i] = True
                        log.warning(
                            "output falls behind; batches are acknowledged without waiting for it",
                            output=out.name,
                        )
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), remaining)

    def points(self, ticket: int) -> Points:
        """Each output file's end of batch `ticket`, by path; None for a file that has not
        finished it (falling behind). Forgets the points of earlier batches."""
        out: Points = {}
        for o in self.outputs:
            point = o.point_at(ticket)
            if o.state_key is not None:
                out[o.state_key] = list(point) if point else None
            o.forget_points(ticket)
        return out


def take_back(outputs: Sequence[Output], saved: Mapping[str, Sequence[int] | None]) -> list[str]:
    """Cut each JSON-lines file back to where the last acknowledged batch ended (see
    OutputGate), as the replay state saved it; what was done, for the log."""
    notes = []
    for out in outputs:
        if not isinstance(out, JsonlOutput):
            continue
        key = out.state_key
        if key is None or key not in saved:
            continue
        point = saved[key]
        if point is None:
            notes.append(
                f"output {out.name}: it was behind when the last batch was "
                "acknowledged; lines of unacknowledged batches may appear twice"
            )
            continue
        dev, ino, size = point
        note = out.take_back((dev, ino, size))
        if note:
            notes.append(f"output {out.name}: {note}")
    return notes
