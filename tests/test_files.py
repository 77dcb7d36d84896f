"""Atomic writes: a failed write leaves the old file untouched and no temporary behind; results are readable."""

from __future__ import annotations

import os
import stat

import pytest

from fakegpt.files import atomic_dir, atomic_path, write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    target = tmp_path / "train.bin"
    target.write_bytes(b"old complete data")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old complete data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin"]


def test_results_get_the_permissions_of_a_plain_open(tmp_path):
    write_text(tmp_path / "meta.json", "{}\n")
    assert stat.S_IMODE((tmp_path / "meta.json").stat().st_mode) == 0o666 & ~_umask()
    with atomic_dir(tmp_path / "checkpoint") as folder:
        (folder / "config.json").write_text("{}")
    assert stat.S_IMODE((tmp_path / "checkpoint").stat().st_mode) == 0o777 & ~_umask()


def test_atomic_dir_replaces_a_previous_folder_only_on_success(tmp_path):
    tmp_path = tmp_path / "out"
    final = tmp_path / "checkpoint"
    with atomic_dir(final) as folder:
        (folder / "model.safetensors").write_text("v1")
    with pytest.raises(ValueError), atomic_dir(final) as folder:
        (folder / "model.safetensors").write_text("partial")
        raise ValueError("interrupted")
    assert (final / "model.safetensors").read_text() == "v1"
    with atomic_dir(final) as folder:
        (folder / "model.safetensors").write_text("v2")
    assert (final / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_output_dir_moves_results_in_and_leaves_other_files_alone(tmp_path):
    from fakegpt.files import output_dir

    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "meta.json").write_text("old")
    with output_dir(out, ("train.bin", "meta.json")) as work:
        assert work.parent == out and work.name.startswith(".work-")
        (work / "train.bin").write_bytes(b"new")
        (work / "meta.json").write_text("new")
        assert (out / "meta.json").read_text() == "old"  # the old one stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.txt", "train.bin"]
    assert (out / "meta.json").read_text() == "new" and (out / "notes.txt").read_text() == "mine"


def test_output_dir_failure_in_a_new_folder_removes_what_it_created(tmp_path):
    from fakegpt.errors import FakegptError
    from fakegpt.files import output_dir

    (tmp_path / "x").mkdir()
    out = tmp_path / "x" / "a" / "b" / "ds"
    with pytest.raises(FakegptError, match=f"{out}: could not write the output .*; nothing was kept"):
        with output_dir(out, ("train.bin",)) as work:
            (work / "train.bin").write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert list((tmp_path / "x").iterdir()) == []


def test_output_dir_is_claimed_by_one_run_at_a_time(tmp_path):
    from fakegpt.errors import FakegptError
    from fakegpt.files import output_dir

    out = tmp_path / "ds"
    with output_dir(out, ("x",)) as work:
        (work / "x").write_text("1")
        with pytest.raises(FakegptError, match=f"{out}: in use by another run"), output_dir(out, ("x",)):
            pass
        assert (out / ".fakegpt.lock").exists()
    assert sorted(p.name for p in out.iterdir()) == ["x"]


def test_read_text_names_the_file_and_line_of_bytes_that_are_not_utf8(tmp_path):
    from fakegpt.errors import FakegptError
    from fakegpt.files import read_text

    path = tmp_path / "c.yaml"
    path.write_bytes("name: x\n# coment\u00e1rio\n".encode("latin-1"))
    with pytest.raises(FakegptError, match=r"c.yaml: line 2: not UTF-8 text \(byte 0xe1\)"):
        read_text(path)


@pytest.mark.parametrize(
    "content, message",
    [(b"id,message\r1,a\r", "CR-only line ends"), ("id\n".encode("utf-16"), "NUL bytes")],
)
def test_check_text_input_refuses_what_csv_readers_cannot_read(tmp_path, content, message):
    import gzip

    from fakegpt.errors import FakegptError
    from fakegpt.files import check_text_input

    for path in (tmp_path / "x.csv", tmp_path / "x.csv.gz"):
        path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
        with pytest.raises(FakegptError, match=f"{path.name}: .*{message}"):
            check_text_input(path)


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

    from fakegpt import files

    if direct == "no pwrite":
        monkeypatch.delattr(files.os, "pwrite")
        direct = False

    path = tmp_path / "state.pt"
    blocks = _mixed_blocks(0)
    with files.DurableFile(path, direct=direct) as fh:
        for block in blocks:
            assert fh.write(memoryview(block)) == len(block)
    assert fh.direct == (direct and _direct_io_here(tmp_path))
    data = path.read_bytes()
    assert len(data) % files.DIRECT_ALIGN != 0 and fh.size == len(data)
    assert data == b"".join(blocks)
    assert fh.crc == zlib.crc32(data)


def test_durable_file_without_direct_io_starts_the_disk_on_each_window(tmp_path, monkeypatch):
    """Through the page cache (a file system without O_DIRECT) writeback is asked for each window as it
    fills, in order, never past what the OS already has."""
    from fakegpt import files

    pushed: list[tuple[int, int, int]] = []  # (offset, length, bytes in the file when asked)
    path = tmp_path / "state.pt"
    monkeypatch.setattr(files, "WRITEBACK_BYTES", 3 << 20)
    monkeypatch.setattr(files, "STAGING_BYTES", 1 << 20)
    monkeypatch.setattr(files, "start_writeback", lambda fd, off, n: pushed.append((off, n, os.fstat(fd).st_size)))
    blocks = _mixed_blocks(1)
    with files.DurableFile(path, direct=False) as fh:
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

    from fakegpt import files

    monkeypatch.setattr(files, "STAGING_BYTES", 1 << 20)
    real = os.pwrite
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(files.os, "pwrite", full_disk)
    path = tmp_path / "state.pt"
    with pytest.raises(OSError, match="No space left"):
        with files.DurableFile(path) as fh:
            for _ in range(20):
                fh.write(bytes(1 << 20))
    assert fh._closed and fh._writer._shutdown


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")
def test_durable_file_goes_on_through_the_page_cache_when_direct_writes_are_refused(tmp_path, monkeypatch):
    """A file system that accepts O_DIRECT at open but refuses the writes (EINVAL): the writer clears the flag
    and writes the same bytes through the page cache; the padded tail is still cut off."""
    import fcntl
    import zlib

    from fakegpt import files

    if not _direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    real = os.pwrite
    refused = []

    def no_direct_writes(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(22, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(files.os, "pwrite", no_direct_writes)
    blocks = _mixed_blocks(2)
    with files.DurableFile(tmp_path / "state.pt") as fh:
        for block in blocks:
            fh.write(block)
    data = (tmp_path / "state.pt").read_bytes()
    assert refused == [0] and not fh.direct
    assert data == b"".join(blocks) and fh.crc == zlib.crc32(data)
