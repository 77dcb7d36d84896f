"""Atomic file writes: write to a temporary name in the same folder, then rename.

An interrupted run never leaves a truncated file under the final name, and an existing result is only
replaced once the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fakegpt.errors import FakegptError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it to `final`, on error remove it.

    `replace=False`: a file that appeared at `final` meanwhile is never replaced (one-line error instead).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        if replace:
            os.replace(tmp_path, final)
        else:
            _publish_new(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _publish_new(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` only if `final` does not exist (a hard link fails on an existing name)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise FakegptError(f"{final}: already exists; use --force to replace it") from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if final.exists():
            raise FakegptError(f"{final}: already exists; use --force to replace it") from None
        os.replace(tmp, final)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success swap it in for `final` (replacing an old one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when there is no such file. Unreadable or not an object: one-line error."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FakegptError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise FakegptError(f"{path}: expected a JSON object")
    return data


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; missing, unreadable or not UTF-8 is a one-line error naming the file (and line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FakegptError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FakegptError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise FakegptError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FakegptError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None


_SNIFF_BYTES = 1 << 16


def check_text_input(path: str | Path) -> None:
    """Refuse, naming the file, an input that is no line-based text: NUL bytes (a binary file, or UTF-16),
    or classic-Mac CR-only line ends, which CSV readers see as one endless line. Reads only the first 64 KiB
    (decompressed for .gz)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            import gzip

            with gzip.open(path, "rb") as fh:
                head = fh.read(_SNIFF_BYTES)
        else:
            with open(path, "rb") as fh:
                head = fh.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        what = "unreadable gzip" if path.suffix == ".gz" else "cannot read"
        raise FakegptError(f"{path}: {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if b"\0" in head:
        raise FakegptError(f"{path}: a binary file (NUL bytes), not a UTF-8 text export (UTF-16? save it as UTF-8)")
    if b"\r" in head and b"\n" not in head:
        raise FakegptError(f"{path}: CR-only line ends (classic Mac); convert them to LF (or CRLF) first")


def write_table(table: Any, out_dir: str | Path, stem: str) -> list[Path]:
    """A polars DataFrame as OUT_DIR/STEM.parquet (for code) and STEM.csv (for people), each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"]
    with atomic_path(paths[0], suffix=".parquet") as tmp:
        table.write_parquet(tmp)
    with atomic_path(paths[1], suffix=".csv") as tmp:
        table.write_csv(tmp)
    return paths


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented UTF-8 JSON to `path` atomically; NaN and infinities become null (an undefined
    interval), since `NaN` is not JSON and strict readers refuse the whole file."""
    write_text(path, json.dumps(_finite(data), indent=2, ensure_ascii=False, default=str, allow_nan=False) + "\n")


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


LOCK_FILE = ".fakegpt.lock"


def lock_folder(folder: Path) -> int:
    """An exclusive, non-blocking lock on FOLDER/.fakegpt.lock (released when the process ends, however it ends).

    Another run holding it is a one-line error naming the folder. The lock file is checked to still be the
    one at that path after locking, so a run that removed it on finishing cannot hand the lock to two others.
    """
    path = folder / LOCK_FILE
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FakegptError(
                f"{folder}: in use by another run (it holds {LOCK_FILE}); wait for it to finish or choose another "
                "output folder"
            ) from None
        except ImportError:  # no flock (Windows): an exclusive create is the claim
            os.close(fd)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise FakegptError(
                    f"{folder}: in use by another run ({LOCK_FILE} exists; remove it if no run is writing there)"
                ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: take the new one
    raise FakegptError(f"{folder}: in use by other runs (could not claim {LOCK_FILE})")


def _created_parents(folder: Path) -> list[Path]:
    """The folders from `folder` upwards that do not exist yet (what a mkdir -p would create), innermost first."""
    missing = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def _os_error_text(exc: OSError, folder: Path) -> str:
    """An OSError as text; a short write (numpy's `tofile` says only "N requested and M written") on a full
    file system is named as what it is."""
    text = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else (exc.strerror or str(exc))
    if exc.errno is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < (1 << 20):
                text = f"No space left on device: {text}"
    return text


@contextlib.contextmanager
def output_dir(final: str | Path, names: tuple[str, ...]) -> Iterator[Path]:
    """Claim the output folder `final` for this run and yield an empty work folder on the same file system.

    The claim is an exclusive lock held for the whole run, so two runs into one folder cannot both write
    there: the second fails at once, naming the folder. On success the files `names` are moved from the
    work folder into `final` (the last of them, e.g. meta.json, is removed first and moved in last, so a
    folder is never vouched for while it is half replaced); an old result stays whole until the new one is
    complete. On failure everything this run created goes: the work folder, and `final` itself (and the
    parents) if this run made it; files already in `final` are left as they were. Other files in `final`
    are never touched. The work folder lives inside `final`, so the moves are renames even when `final` is
    a mount point.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise FakegptError(f"{final}: exists and is not a folder")
    created = _created_parents(final)
    try:
        final.mkdir(parents=True)
    except FileExistsError:
        created = []  # another run made it first: not ours to remove
    fd = None
    work = None
    try:
        fd = lock_folder(final)
        for stale in final.glob(".work-*.tmp"):  # left by a killed run; no other run can be using them now
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".work-", suffix=".tmp", dir=final))
        yield work
        last = final / names[-1]
        if last.exists():
            last.unlink()
        for name in names:
            os.chmod(work / name, 0o666 & ~_umask())
            os.replace(work / name, final / name)
    except BaseException as exc:
        why = _os_error_text(exc, final) if isinstance(exc, OSError) else ""  # before cleaning up frees space
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if created and fd is not None:  # never remove a folder another run claimed first
            shutil.rmtree(final, ignore_errors=True)
            for parent in created[1:]:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only if still empty
        elif fd is not None:
            with contextlib.suppress(OSError):
                (final / LOCK_FILE).unlink()
        if isinstance(exc, OSError):
            kept = "nothing was kept" if created else "the files already there are unchanged"
            raise FakegptError(f"{final}: could not write the output ({why}); {kept}") from exc
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            (final / LOCK_FILE).unlink()
    finally:
        if fd is not None:
            os.close(fd)
