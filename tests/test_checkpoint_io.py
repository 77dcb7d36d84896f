"""The durable checkpoint writer (`fakegpt.models.checkpoint_io.DurableFile`): exactly the bytes given, their
CRC-32, direct I/O where the file system takes it and the page cache where it does not, and write errors raised
in the caller's thread."""

from __future__ import annotations

import os

import pytest


def _direct_io_here(folder) -> bool:
    """Whether this file system takes O_DIRECT (ext4, xfs: yes; tmpfs on older kernels: no)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)
    return True


def _mixed_blocks(seed: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    sizes = [100, 70_000, 1 << 20, (5 << 20) + 3, 4096, (8 << 20) - 1]
    return [rng.randbytes(rng.choice(sizes)) for _ in range(12)]


@pytest.mark.parametrize("direct", [True, False, "no pwrite"])
def test_durable_file_writes_and_checksums_exactly_the_bytes_given(tmp_path, monkeypatch, direct):
    """Blocks smaller and larger than a staging buffer, and a size that is no multiple of the O_DIRECT
    alignment: the file holds exactly those bytes (the padded last block cut off) and `crc` is their CRC-32.
    "no pwrite": an OS without os.pwrite (Windows) seeks and writes instead."""
    import zlib

    from fakegpt.models import checkpoint_io

    if direct == "no pwrite":
        monkeypatch.delattr(checkpoint_io.os, "pwrite")
        direct = False

    path = tmp_path / "state.pt"
    blocks = _mixed_blocks(0)
    with checkpoint_io.DurableFile(path, direct=direct) as fh:
        for block in blocks:
            assert fh.write(memoryview(block)) == len(block)
    assert fh.direct == (direct and _direct_io_here(tmp_path))
    data = path.read_bytes()
    assert len(data) % checkpoint_io.DIRECT_ALIGN != 0 and fh.size == len(data)
    assert data == b"".join(blocks)
    assert fh.crc == zlib.crc32(data)


def test_durable_file_without_direct_io_starts_the_disk_on_each_window(tmp_path, monkeypatch):
    """Through the page cache (a file system without O_DIRECT) writeback is asked for each window as it
    fills, in order, never past what the OS already has."""
    from fakegpt.models import checkpoint_io

    pushed: list[tuple[int, int, int]] = []  # (offset, length, bytes in the file when asked)
    path = tmp_path / "state.pt"
    monkeypatch.setattr(checkpoint_io, "WRITEBACK_BYTES", 3 << 20)
    monkeypatch.setattr(checkpoint_io, "STAGING_BYTES", 1 << 20)

    def asked(fd, off, n):
        pushed.append((off, n, os.fstat(fd).st_size))

    monkeypatch.setattr(checkpoint_io, "start_writeback", asked)
    blocks = _mixed_blocks(1)
    with checkpoint_io.DurableFile(path, direct=False) as fh:
        for block in blocks:
            fh.write(block)
    data = path.read_bytes()
    assert data == b"".join(blocks) and not fh.direct
    assert pushed and pushed[0][0] == 0
    for (off, n, _), (next_off, _, _) in zip(pushed, pushed[1:], strict=False):
        assert next_off == off + n  # consecutive windows, each at least WRITEBACK_BYTES
    for off, n, size in pushed:
        assert n >= 3 << 20 and off + n <= size  # only bytes the OS already has
    assert pushed[-1][0] + pushed[-1][1] > len(data) - (4 << 20)  # at most a window and a buffer for the fsync


def test_durable_file_reports_a_failed_write_and_closes_cleanly(tmp_path, monkeypatch):
    """A write the disk refuses (ENOSPC in the writer thread) is raised in the caller's thread, at a later
    write or at close, and no buffer or thread is left waiting."""
    import errno

    from fakegpt.models import checkpoint_io

    monkeypatch.setattr(checkpoint_io, "STAGING_BYTES", 1 << 20)
    real = os.pwrite
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(checkpoint_io.os, "pwrite", full_disk)
    path = tmp_path / "state.pt"
    with pytest.raises(OSError, match="No space left"):
        with checkpoint_io.DurableFile(path) as fh:
            for _ in range(20):
                fh.write(bytes(1 << 20))
    assert fh._closed and fh._writer._shutdown


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")
def test_durable_file_goes_on_through_the_page_cache_when_direct_writes_are_refused(tmp_path, monkeypatch):
    """A file system that accepts O_DIRECT at open but refuses the writes (EINVAL): the writer clears the flag
    and writes the same bytes through the page cache; the padded tail is still cut off."""
    import fcntl
    import zlib

    from fakegpt.models import checkpoint_io

    if not _direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    real = os.pwrite
    refused = []

    def no_direct_writes(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(22, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(checkpoint_io.os, "pwrite", no_direct_writes)
    blocks = _mixed_blocks(2)
    with checkpoint_io.DurableFile(tmp_path / "state.pt") as fh:
        for block in blocks:
            fh.write(block)
    data = (tmp_path / "state.pt").read_bytes()
    assert refused == [0] and not fh.direct
    assert data == b"".join(blocks) and fh.crc == zlib.crc32(data)
