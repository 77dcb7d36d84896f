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
