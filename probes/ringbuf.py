"""Read a BPF ring buffer map directly through mmap, many records per wakeup.

BCC's reader calls back into Python through ctypes once per record, which costs more than
decoding the record. The ring buffer's memory layout is a stable kernel ABI
(include/uapi/linux/bpf.h, kernel/bpf/ringbuf.c):

- page 0, read-write: the consumer position (u64), advanced by the reader;
- page 1, read-only: the producer position (u64);
- then the data area, mapped twice in a row so that a record that wraps around the end is
  still contiguous in memory.

Each record starts with an 8-byte header: a u32 length whose top bits are BUSY (being
written) and DISCARD (dropped by the program), and a u32 page offset. Records are padded to
8 bytes. This module only parses; it never writes anything but the consumer position.

The two positions are read and written as whole aligned 64-bit words through ctypes. Byte
copies (struct, memoryview slices) can tear, and a torn consumer position that runs ahead
of the producer makes every reservation in the kernel fail as if the ring were full.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import select
import struct

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8

_U32 = struct.Struct("<I")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(fd: int, length: int, prot: int, offset: int) -> int:
    addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the ring buffer failed: {os.strerror(err)}")
    return int(addr)


class RingBufferReader:
    """The consumer side of one BPF ring buffer map, given its fd and data size in bytes."""

    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self._page = page
        self._mask = data_size - 1
        self._cons_len = page
        self._data_len = page + 2 * data_size
        self._cons_addr = _map(map_fd, self._cons_len, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        try:
            self._data_addr = _map(map_fd, self._data_len, mmap.PROT_READ, page)
        except OSError:
            _libc.munmap(self._cons_addr, self._cons_len)
            raise
        self._cons = ctypes.c_uint64.from_address(self._cons_addr)
        self._prod = ctypes.c_uint64.from_address(self._data_addr)
        # Read-only memory: this view is only ever read from.
        self._view = memoryview((ctypes.c_char * self._data_len).from_address(self._data_addr))
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        # Written by interrupt(), so that a reader blocked in wait() can be stopped at once
        # however long it waits for records.
        self._interrupt = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._interrupt, select.EPOLLIN)
        self._closed = False

    def also_wake_on(self, fd: int) -> None:
        """Make wait() return when `fd` (another ring's map) signals data too, so one
        thread waits for several rings."""
        self._epoll.register(fd, select.EPOLLIN)

    def wait(self, timeout: float) -> None:
        """Sleep until the kernel signals new data, interrupt() is called, or `timeout`
        seconds pass."""
        self._epoll.poll(timeout)

    def interrupt(self) -> None:
        """Make wait() return now, and at once from then on (to stop the reader)."""
        if not self._closed:
            os.eventfd_write(self._interrupt, 1)

    def read(self, limit: int = 1 << 16) -> list[bytes]:
        """Copy out up to `limit` committed records and release their space to the kernel."""
        cons = self._cons.value
        prod = self._prod.value
        base = self._page  # the data area starts after the producer page
        mask = self._mask
        view = self._view
        unpack = _U32.unpack_from
        out: list[bytes] = []
        while cons < prod and len(out) < limit:
            off = base + (cons & mask)
            length = unpack(view, off)[0]
            if length & BUSY:
                break  # the producer has not committed this record yet
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                out.append(view[off + HEADER : off + HEADER + size].tobytes())
            cons += (size + HEADER + 7) & ~7
        self._cons.value = cons
        return out

    def close(self) -> None:
        self._closed = True
        self._epoll.close()
        os.close(self._interrupt)
        self._view.release()
        _libc.munmap(self._data_addr, self._data_len)
        _libc.munmap(self._cons_addr, self._cons_len)
