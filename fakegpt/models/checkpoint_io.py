"""Checkpoint I/O: the durable writer behind the safetensors writer (`fakegpt.models.weights`) and the resume
state (`fakegpt.finetune.state`), and the CRC-32 that checks what it wrote.

A checkpoint is gigabytes written once, front to back, then renamed into place; it has to be on the disk, not in
a cache, when the rename publishes it, and it is checked against its CRC-32 when it is read back. `DurableFile`
writes it with direct I/O and checksums it as it goes; `fsync_files` makes a whole folder durable before the
rename; `crc32_of` checks a file that was written earlier.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def fsync_files(folder: str | Path) -> None:
    """Flush every file in `folder` (and the folder's entries) to the disk: what a rename then publishes
    survives a machine crash, not only a killed process."""
    folder = Path(folder)
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITEBACK_BYTES = 64 << 20  # buffered fallback: how far written bytes run ahead of the disk
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of the device's block (4 KiB covers all)
STAGING_BYTES = 8 << 20  # one staging buffer; a few of them let serialising, checksumming and the disk overlap
STAGING_BUFFERS = 3


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes of `fd` from `offset` to the disk now, without waiting.

    On Linux, POSIX_FADV_DONTNEED starts the range's writeback (and drops its pages from the cache once they are
    clean: a checkpoint is not read back soon). Elsewhere it does nothing: the final fsync writes everything.
    """
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _open_for_writing(path: str | Path, direct: bool) -> tuple[int, bool]:
    """(fd, whether it bypasses the page cache). O_DIRECT where the OS and file system take it, else buffered."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    o_direct = getattr(os, "O_DIRECT", 0)
    if direct and o_direct:
        try:
            return os.open(path, flags | o_direct, 0o666), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT (tmpfs on older kernels)
                raise
    return os.open(path, flags, 0o666), False


def _pwrite(fd: int, data: Any, offset: int) -> int:
    """os.pwrite, or seek + write where there is none (Windows); only the one writer thread moves the offset."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


class DurableFile:
    """A binary file of gigabytes written front to back (a checkpoint), durable once `close()` returns.

    - The bytes bypass the page cache (O_DIRECT): they are copied into page-aligned staging buffers and a
      writer thread hands each full buffer to the disk while the caller produces the next. Through the page
      cache, the kernel's writeback on this VM's disk reached ~500 MB/s where direct writes of the same bytes
      reached ~1.8 GB/s (`tools/bench_checkpoint.py --disk` measures both); a multi-GB checkpoint also no longer
      pushes the training data out of the cache. The last partial buffer is written padded to the alignment,
      then the file is cut to its size.
    - Where the file system refuses O_DIRECT (at open, or at the first write), the same buffers are written
      through the page cache, and every WRITEBACK_BYTES the disk is asked to start on what came before (else
      the fsync would pay for it all).
    - `crc`: the CRC-32 of everything written, computed on each staging buffer while the previous one is on
      its way to the disk: no second pass over the file. The copy (numpy), the checksum (zlib) and the writes
      release the GIL, so a background write leaves the training thread's Python alone.
    """

    def __init__(self, path: str | Path, direct: bool = True):
        self._fd, self.direct = _open_for_writing(path, direct)
        self.crc = 0
        self.size = 0  # bytes written so far (the file's size once closed)
        # anonymous maps are page-aligned, as O_DIRECT needs; numpy copies into them without holding the GIL
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(STAGING_BUFFERS):
            self._free.put(np.frombuffer(mmap.mmap(-1, STAGING_BYTES), dtype=np.uint8))
        self._buffer: np.ndarray | None = None
        self._fill = 0
        self._offset = 0  # where the buffer being filled goes in the file
        self._pushed = 0  # buffered fallback: bytes whose writeback has been started
        self._error: BaseException | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fakegpt-write")
        self._pending: list[Future] = []
        self._closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            if self._buffer is None:
                self._buffer = self._take_buffer()
            n = min(len(view) - pos, STAGING_BYTES - self._fill)
            np.copyto(self._buffer[self._fill : self._fill + n], np.frombuffer(view[pos : pos + n], dtype=np.uint8))
            self._fill += n
            pos += n
            if self._fill == STAGING_BYTES:
                self._submit()
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        """Nothing to do: full buffers are already on their way; the rest is written by close()."""

    def close(self) -> None:
        """Write what is left, wait for the disk and fsync: the bytes are on the disk, not only in a cache."""
        if self._closed:
            return
        try:
            if self._fill:
                self._submit()
            self._wait()
            if os.fstat(self._fd).st_size != self.size:
                os.ftruncate(self._fd, self.size)  # the last block went out padded to the alignment
            os.fsync(self._fd)
        finally:
            self._release()

    def _take_buffer(self) -> np.ndarray:
        buffer = self._free.get()  # waits while every buffer is with the writer: the disk sets the pace
        if self._error is not None:
            self._free.put(buffer)
            raise self._error
        return buffer

    def _submit(self) -> None:
        buffer, n, offset = self._buffer, self._fill, self._offset
        assert buffer is not None
        self.crc = zlib.crc32(buffer[:n].data, self.crc)
        length = n
        if self.direct and n % DIRECT_ALIGN:  # only the last buffer of a file is partial
            length = n + DIRECT_ALIGN - n % DIRECT_ALIGN
            buffer[n:length] = 0
        self._buffer, self._fill, self._offset = None, 0, offset + n
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._writer.submit(self._write_out, buffer, length, offset))

    def _write_out(self, buffer: np.ndarray, length: int, offset: int) -> None:
        """Writer thread: one staging buffer to the file at `offset`; the buffer goes back to the free list."""
        try:
            if self._error is not None:
                return
            done = 0
            while done < length:
                try:
                    done += _pwrite(self._fd, buffer[done:length], offset + done)
                except OSError as exc:
                    if not (self.direct and exc.errno == errno.EINVAL):
                        raise
                    self._stop_direct_io()  # opened with O_DIRECT, but this file system refuses the writes
            if not self.direct and offset + length - self._pushed >= WRITEBACK_BYTES:
                start_writeback(self._fd, self._pushed, offset + length - self._pushed)
                self._pushed = offset + length
        except BaseException as exc:  # noqa: B036 - handed to the caller's thread on its next write or close
            self._error = exc
        finally:
            self._free.put(buffer)

    def _stop_direct_io(self) -> None:
        """Writer thread: go on through the page cache (a file system that takes O_DIRECT at open, not at write)."""
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _wait(self) -> None:
        for future in self._pending:
            future.result()
        self._pending = []
        if self._error is not None:
            raise self._error

    def _release(self) -> None:
        self._closed = True
        self._writer.shutdown(wait=True)
        os.close(self._fd)
        # the staging maps are unmapped with their last reference (a failed write's traceback may hold one)
        self._free = queue.SimpleQueue()
        self._buffer = None

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:  # the caller removes the half-written file; no fsync for it
            self._release()


def crc32_of(path: str | Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of a file, read in 16 MiB blocks."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc
