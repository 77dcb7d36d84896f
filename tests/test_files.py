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
