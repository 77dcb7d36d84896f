"""Read Telegram CSV exports in bounded-memory batches: well-formed RFC 4180 CSV and naive exports.

A file is read in byte chunks (default 8 MiB) that always end on a record boundary, and each chunk is parsed
by polars. Memory therefore stays flat however large the file is, gzip files stream the same way, and line
numbers stay known for error messages.

- Well-formed CSV: a chunk ends at a newline before which the number of `"` is even (doubled quotes count
  twice, so the parity is exactly "not inside a quoted field").
- Naive export (message column not quoted; the original project's Perl pass): a row is
  `<integer>,<integer>,<date>,` followed by the rest of the line as the message, commas, quotes, trailing
  comma and all; a line that does not start like that continues the previous message. Nothing is cut at the
  first comma (what polars does with `quote_char=None, truncate_ragged_lines=True`).

Each batch is a DataFrame with `channel_id` (Int64), `date` (String), `message` (String), and
`forwarded_from` (String) where the header has that column (or `--columns` maps one to it).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import polars as pl

from fakegpt.data.chats import chat_ids
from fakegpt.errors import FakegptError

REQUIRED = ("id", "channel_id", "date", "message")
FORMATS = ("auto", "csv", "naive")
MAX_EXAMPLES = 5  # bad rows quoted by line number in the log and meta.json
_SNIFF_BYTES = 1 << 20


BAD_CHAT = "channel_id is not an integer or a @username"


def chat_column(values: pl.Series) -> pl.Series:
    """A chat column read as text -> Int64 ids, or String identities where some rows name a @username."""
    ids = values.str.strip_chars().cast(pl.Int64, strict=False)
    if ids.null_count() > values.null_count():
        return chat_ids(values)
    return ids


def _constant(chat: int | str, n: int) -> pl.Series:
    return pl.Series("channel_id", [chat] * n, dtype=pl.Int64 if isinstance(chat, int) else pl.String)


@dataclasses.dataclass
class ReadStats:
    """What reading one file found; summed over files into meta.json."""

    format: str = ""
    rows: int = 0
    repaired_rows: int = 0  # naive rows whose message had a comma, a quote or several lines
    continuation_lines: int = 0  # naive lines that continued the previous message
    bad_rows: int = 0  # rows that could not be parsed even as naive rows, or had no channel_id
    bad_row_examples: list[str] = dataclasses.field(default_factory=list)
    invalid_utf8: int = 0  # invalid UTF-8 sequences, decoded as U+FFFD
    bytes_read: int = 0
    sha256: str = ""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # messages a reader dropped, by reason
    chats: list[dict] = dataclasses.field(default_factory=list)  # Telegram JSON: one record per chat
    chat: int | str | None = None  # the chat given to every row (--channel-id, or the file's name), if any
    mapped: bool = False  # CSV: read by a collector's column names (--columns, or the names tables tries)

    def bad(self, where: str, why: str) -> None:
        """Count one unreadable row and keep its first examples (with `where`: file and line) for meta.json."""
        self.bad_rows += 1
        if len(self.bad_row_examples) < MAX_EXAMPLES:
            self.bad_row_examples.append(f"{where}: {why}")


class _HashingReader:
    """Wraps a binary file: hashes (sha256) and counts the raw bytes as they are read, on disk format."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha = raw, hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def finish(self) -> str:
        # Hash whatever a reader left unread (a gzip trailer, bytes after a parse error) so sha256 is the file's.
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def _open(path: str, raw: BinaryIO) -> tuple[BinaryIO, _HashingReader]:
    hashing = _HashingReader(raw)
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if path.endswith(".gz") or head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=hashing, mode="rb"), hashing  # type: ignore[arg-type]
    return hashing, hashing  # type: ignore[return-value]


def _read(f: BinaryIO, n: int, path: str) -> bytes:
    try:
        return f.read(n)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as exc:
        raise FakegptError(f"{path}: unreadable gzip file ({exc})") from None


def _header(line: bytes, path: str, columns: dict[str, str] | None = None, chat_given: bool = False) -> list[str]:
    """The header's names, renamed to the standard fields; errors quote the names as the file spells them.

    With `chat_given` (the chat of every row is known: `--channel-id`, or the file's name), a file without a
    chat column is read too, and one without the standard names by the names collectors use (tables.CANDIDATES).
    """
    text = line.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
    if not text.strip():
        raise FakegptError(f"{path}: line 1: empty header line (expected columns {', '.join(REQUIRED)})")
    spelled = [n.strip() for n in next(csv.reader([text]))]
    names = [n.lower() for n in spelled]
    if columns:
        return map_header(names, columns, path, spelled, chat_given)
    needed = [c for c in REQUIRED if not (chat_given and c in ("id", "channel_id"))]
    missing = [c for c in needed if c not in names]
    if missing and chat_given:
        from fakegpt.data.tables import CANDIDATES  # (tables imports this module)

        found = {f: next((c for c in CANDIDATES[f] if c in names), None) for f in ("channel_id", *needed)}
        auto = {f: c for f, c in found.items() if c is not None and c != f and f not in names}
        if auto:
            return map_header(names, auto, path, spelled, chat_given)
    if missing:
        raise FakegptError(
            f"{path}: line 1: missing column {missing[0]!r} (header has: {', '.join(spelled)}; "
            f"needs {', '.join(needed)})"
        )
    return names


def _plain_names(line: bytes) -> list[str]:
    return [n.strip().lower() for n in next(csv.reader([line.decode("utf-8", "replace").lstrip("\ufeff")]))]


def map_header(
    names: list[str],
    columns: dict[str, str],
    path: str,
    spelled: list[str] | None = None,
    chat_given: bool = False,
) -> list[str]:
    """Rename the header's columns by `columns` (field -> the file's column name; `--columns`), so the rest
    reads the file as if it had the standard names. The file must have each mapped column; `id` may be absent,
    and `channel_id` too where the chat is given. An empty name is a column whose header cell is empty."""
    shown = ", ".join(spelled if spelled is not None else names)
    lower = {v.strip().lower(): k for k, v in columns.items()}
    for field, col in columns.items():
        if col.strip().lower() not in names:
            raise FakegptError(f"{path}: line 1: --columns {field}={col}: no column {col!r} (header has: {shown})")
    # A standard name that another field's mapping replaces must not be read as that field too.
    renamed = [lower.get(n, f"_unused_{n}" if n in columns else n) for n in names]
    needed = [c for c in REQUIRED[1:] if not (chat_given and c == "channel_id")]
    missing = [c for c in needed if c not in renamed]
    if missing:
        raise FakegptError(
            f"{path}: line 1: no column for {missing[0]!r} (header has: {shown}); "
            f"map one with --columns {missing[0]}=NAME"
        )
    return renamed


def _csv_cut(buf: bytes) -> int:
    """Index just past the last newline outside a quoted field, or 0 if there is none yet."""
    end = buf.rfind(b"\n")
    after = 0  # quotes after `end`
    total = buf.count(b'"')
    prev = len(buf)
    while end >= 0:
        after += buf.count(b'"', end, prev)
        if (total - after) % 2 == 0:
            return end + 1
        prev = end
        end = buf.rfind(b"\n", 0, end)
    return 0


def _naive_cut(row_start: re.Pattern[bytes]) -> Callable[[bytes], int]:
    def cut(buf: bytes) -> int:
        """Index just past the last newline followed by a row start (continuation lines stay together)."""
        end = buf.rfind(b"\n")
        while end >= 0:
            if row_start.match(buf, end + 1):
                return end + 1
            end = buf.rfind(b"\n", 0, end)
        return 0

    return cut


def _chunks(
    f: BinaryIO, first: bytes, cut: Callable[[bytes], int], chunk_bytes: int, path: str
) -> Iterator[tuple[bytes, int]]:
    """Yield (chunk, line number of its first line); every chunk ends on a record boundary."""
    buf, line = first, 2
    while True:
        data = _read(f, chunk_bytes, path)
        if data:
            buf += data
            at = cut(buf) if len(buf) >= chunk_bytes else 0
            if at:
                piece, buf = buf[:at], buf[at:]
                yield piece, line
                line += piece.count(b"\n")
            continue
        if buf:
            yield buf, line
        return


def _naive_row_regex(names: list[str]) -> tuple[str, bytes]:
    """The prefix a naive row starts with: every column before `message`, integers where they must be."""
    if names[-1] != "message":
        raise FakegptError("naive exports need `message` as the last column")
    if names[:3] != list(REQUIRED[:3]):  # the repair reads the chat and the date by position
        raise FakegptError(f"naive exports need the columns {', '.join(REQUIRED)} in that order")
    parts = [r"-?\d+" if n in ("id", "channel_id") else r"[^,\n]*" for n in names[:-1]]
    pattern = "^" + ",".join(parts) + ","
    return pattern, pattern[1:].encode()


def sniff_format(sample: bytes, names: list[str]) -> str:
    """'csv' if every complete record of the sample parses with the header's field count, else 'naive'."""
    end = _csv_cut(sample)
    try:
        records = list(csv.reader(io.StringIO(sample[:end].decode("utf-8", "replace"), newline=""), strict=True))
    except csv.Error:
        return "naive"
    return "naive" if any(len(r) != len(names) for r in records if r) else "csv"


def _parse_csv(piece: bytes, names: list[str], line: int, path: str) -> pl.DataFrame:
    schema = {n if n else f"_col{i}": pl.String for i, n in enumerate(names)}
    if len(set(schema)) != len(schema):
        schema = {f"{n}_{i}": pl.String for i, n in enumerate(names)}
    cols = list(schema)
    try:
        df = pl.read_csv(piece, has_header=False, schema=schema, encoding="utf8-lossy", infer_schema=False)
        wanted = [c for c in (*REQUIRED[1:], "forwarded_from") if c in names]
        df = df.select(cols[names.index(c)] for c in wanted)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(first) > 160:  # polars quotes the whole offending field, which can be an entire article
            first = first[:100] + " ... " + first[-50:]
        last = line + piece.count(b"\n")
        raise FakegptError(
            f"{path}: lines {line}-{last}: malformed CSV ({first}); if the message column is not quoted, "
            "use --format naive"
        ) from None
    df.columns = wanted
    return df


def _parse_naive(piece: bytes, line: int, row_prefix: str, ncols: int, stats: ReadStats, path: str) -> pl.DataFrame:
    text = piece.decode("utf-8", "replace")
    lines = pl.Series("line", [text]).str.split("\n").explode()
    if text.endswith("\n"):
        lines = lines.head(len(lines) - 1)
    df = pl.DataFrame({"line": lines.str.strip_suffix("\r")}).with_row_index("n")
    df = df.with_columns(row=pl.col("line").str.contains(row_prefix))
    df = df.with_columns(rec=pl.col("row").cum_sum())
    orphans = df.filter(pl.col("rec") == 0)
    for n in orphans["n"].head(MAX_EXAMPLES).to_list():
        stats.bad(f"{path}: line {line + n}", "not a row `id,channel_id,date,message...` and no row before it")
    stats.bad_rows += max(0, orphans.height - MAX_EXAMPLES)
    df = df.filter(pl.col("rec") > 0)
    fields = pl.col("line").str.splitn(",", ncols).struct
    df = df.with_columns(
        channel_id=pl.when("row").then(fields.field("field_1")),
        date=pl.when("row").then(fields.field("field_2")),
        message=pl.when("row").then(fields.field(f"field_{ncols - 1}")).otherwise(pl.col("line")),
    )
    conts = df.height - int(df["row"].sum())
    if conts:
        stats.continuation_lines += conts
        df = df.group_by("rec", maintain_order=True).agg(
            pl.col("channel_id").first(),
            pl.col("date").first(),
            pl.col("message").str.join("\n"),
            pl.len().alias("nlines"),
        )
        multi = pl.col("nlines") > 1
    else:
        multi = pl.lit(False)
    repaired = df.select((multi | pl.col("message").str.contains(r"[,\"]")).sum()).item()
    stats.repaired_rows += int(repaired)
    return df.select("channel_id", "date", "message")


def read_csv_batches(
    path: str,
    fmt: str = "auto",
    chunk_bytes: int = 8 << 20,
    raw: BinaryIO | None = None,
    stats: ReadStats | None = None,
    header_only: bool = False,
    columns: dict[str, str] | None = None,
    chat: int | str | None = None,
    fallback_chat: int | str | None = None,
) -> Iterator[pl.DataFrame]:
    """Yield DataFrames (channel_id, date, message) from one export; `stats` is filled in as it goes.

    `raw` reads from an open binary stream instead of `path` (the embedded demo data); `path` then only names
    it in messages. `columns` maps fields to the file's own column names (`--columns message=text,...`).
    `chat` is the chat of every row (a chat column is then not read); `fallback_chat` that of every row of a
    file without a chat column. `channel_id` is Int64, or String where a file names chats by @username.
    """
    if fmt not in FORMATS:
        raise FakegptError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    stats = stats if stats is not None else ReadStats()
    if raw is None:
        p = Path(path)
        if not p.exists():
            raise FakegptError(f"{path}: no such file")
        if p.is_dir():
            raise FakegptError(f"{path}: is a folder, not a CSV file")
        try:
            raw = open(p, "rb")  # noqa: SIM115 (closed in finally below)
        except OSError as exc:
            raise FakegptError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        f, hashing = _open(path, raw)
        head = _read(f, _SNIFF_BYTES, path)
        if not head.strip():
            raise FakegptError(f"{path}: empty file (no header line)")
        nl = head.find(b"\n")
        while nl < 0:  # a header longer than the sniff window
            more = _read(f, _SNIFF_BYTES, path)
            if not more:
                nl = len(head)
                break
            head += more
            nl = head.find(b"\n")
        names = _header(head[:nl], path, columns, chat is not None or fallback_chat is not None)
        stats.mapped = bool(columns) or not set(REQUIRED[2:]) <= set(_plain_names(head[:nl]))
        if chat is None and "channel_id" not in names:
            chat = fallback_chat
        stats.chat = chat
        body = head[nl + 1 :]
        while not body.strip():
            more = _read(f, _SNIFF_BYTES, path)
            if not more:
                raise FakegptError(f"{path}: no messages (a header and no rows)")
            body += more
        if header_only:
            return
        stats.format = sniff_format(body, names) if fmt == "auto" else fmt
        ncols = len(names)
        if stats.format == "naive":
            try:
                row_prefix, raw_prefix = _naive_row_regex(names)
            except FakegptError as exc:
                raise FakegptError(f"{path}: line 1: {exc}") from None
            cut = _naive_cut(re.compile(raw_prefix))
        else:
            cut = _csv_cut
        records = 0
        for piece, line in _chunks(f, body, cut, chunk_bytes, path):
            fffd = piece.count(b"\xef\xbf\xbd")  # genuine U+FFFD in the file, not decoding errors
            if stats.format == "naive":
                df = _parse_naive(piece, line, row_prefix, ncols, stats, path)
            else:
                df = _parse_csv(piece, names, line, path)
            stats.invalid_utf8 += max(0, int(df["message"].str.count_matches("\ufffd", literal=True).sum() or 0) - fffd)
            chan = chat_column(df["channel_id"]) if chat is None else _constant(chat, df.height)
            bad = chan.is_null()
            n_bad = int(bad.sum())
            if n_bad:
                shown = bad.arg_true().head(max(0, MAX_EXAMPLES - len(stats.bad_row_examples))).to_list()
                for i in shown:
                    stats.bad(f"{path}: record {records + i + 1}", BAD_CHAT)
                stats.bad_rows += n_bad - len(shown)
            records += df.height
            df = df.with_columns(channel_id=chan, message=pl.col("message").fill_null("")).filter(~bad)
            stats.rows += df.height
            stats.bytes_read = hashing.count  # on-disk bytes so far (the progress bar)
            yield df
        stats.sha256 = hashing.finish()
        stats.bytes_read = hashing.count
    finally:
        raw.close()
