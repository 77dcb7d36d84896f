"""Other collectors' tables: JSON Lines and Parquet with their own column names, epoch or ISO dates.

Telethon scripts and archives built with it write `text`/`message`/`content` for the message, `peer_id`,
`channel_id` or `chat` for the chat (Telethon's `to_dict()` nests it: `{"_": "PeerChannel", "channel_id": N}`)
and `date` as UTC ISO 8601 or epoch seconds. `--columns message=text,channel_id=peer_id,date=date` names the
file's columns; without it the usual names are tried in that order. Both formats are read in bounded batches
(JSON Lines in byte chunks, Parquet by row group) and yield what csv_reader yields: `channel_id` (Int64),
`date` (String, ISO 8601, UTC where the source said so), `message` (String).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

import polars as pl

from fakegpt.data.chats import chat_ids
from fakegpt.data.csv_reader import BAD_CHAT, ReadStats
from fakegpt.errors import FakegptError

FIELDS = ("id", "channel_id", "date", "message", "forwarded_from")
OPTIONAL = ("id", "forwarded_from")  # read where the table has them
# Column names tried, in order, for a field `--columns` does not map (JSON Lines and Parquet only).
CANDIDATES = {
    "id": ("id", "message_id"),
    "channel_id": ("channel_id", "peer_id", "chat_id", "chat"),
    # A Telegram Desktop message's `date_unixtime` (UTC) before its `date` (local time), as result.json is read.
    "date": ("date_unixtime", "date", "timestamp"),
    "message": ("message", "text", "content"),
    "forwarded_from": ("forwarded_from", "fwd_from"),  # Telethon: {"_": "MessageFwdHeader", "from_name", "from_id"}
}
_PEER_KEYS = ("channel_id", "chat_id", "user_id", "id")  # inside a Telethon peer object
_NUMBER = re.compile(r"^\s*-?\d+(\.\d*)?\s*$")
_NAIVE_ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?$"


def parse_columns(items: list[str] | dict[str, Any], where: str = "--columns") -> dict[str, str]:
    """`["message=text", "channel_id=peer_id"]` (or a YAML mapping) -> {"message": "text", ...}."""
    if isinstance(items, dict):
        pairs = [(k, "" if v is None else v, True) for k, v in items.items()]
    else:
        pairs = [(*str(i).partition("=")[::2], "=" in str(i)) for i in items]
    out: dict[str, str] = {}
    for field, col, has_sep in pairs:
        field, col = str(field).strip(), str(col).strip()
        if field not in FIELDS:
            raise FakegptError(f"{where}: unknown field {field!r} in {field}={col} (fields: {', '.join(FIELDS)})")
        if not has_sep:  # `FIELD=` (nothing after it) names a column whose header is empty (a pandas index)
            raise FakegptError(f"{where}: expected FIELD=COLUMN, got {field!r}")
        out[field] = col
    return out


def resolve(available: list[str], columns: dict[str, str], path: str, chat_given: bool = False) -> dict[str, str]:
    """field -> the file's column, for channel_id, date and message (and id, forwarded_from where present);
    with `chat_given` (the chat of every row is known) the chat column is optional."""
    out = {}
    for field in FIELDS:
        optional = field in OPTIONAL or (chat_given and field == "channel_id")
        if field in columns:
            if columns[field] not in available:
                raise FakegptError(
                    f"{path}: --columns {field}={columns[field]}: no column {columns[field]!r} "
                    f"(the file has: {', '.join(available[:20])})"
                )
            out[field] = columns[field]
            continue
        found = next((c for c in CANDIDATES[field] if c in available), None)
        if found is None and not optional:
            raise FakegptError(
                f"{path}: no column for {field!r} (the file has: {', '.join(available[:20])}); "
                f"map one with --columns {field}=NAME"
            )
        if found is not None:
            out[field] = found
    return out


def channel_ids(values: pl.Series) -> pl.Series:
    """A chat column -> Int64 ids: integers, numeric strings or Telethon peer objects (structs)."""
    if values.dtype == pl.Struct:
        fields = [f.name for f in values.dtype.fields]  # type: ignore[attr-defined]
        keys = [k for k in _PEER_KEYS if k in fields]
        if not keys:
            return pl.Series(values.name, [None] * len(values), dtype=pl.Int64)
        out = values.struct.field(keys[0]).cast(pl.Int64, strict=False)
        for k in keys[1:]:
            out = out.fill_null(values.struct.field(k).cast(pl.Int64, strict=False))
        return out
    if values.dtype == pl.String:
        ids = values.str.strip_chars().cast(pl.Float64, strict=False).cast(pl.Int64, strict=False)
        return chat_ids(values) if ids.null_count() > values.null_count() else ids  # @usernames: as text
    return values.cast(pl.Int64, strict=False)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) or _NUMBER.match(str(value)):
        t = float(value)
        if abs(t) > 1e11:  # milliseconds
            t /= 1000
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    text = str(value).strip()
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text  # kept as it is; a date split drops what does not start with a date
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed.strftime("%Y-%m-%dT%H:%M:%S")


def dates(values: pl.Series) -> pl.Series:
    """Epoch seconds (or ms), ISO 8601 with an offset or `Z`, datetimes -> ISO 8601 strings, UTC where known."""
    if values.dtype == pl.Datetime:
        if values.dtype.time_zone:  # type: ignore[attr-defined]
            values = values.dt.convert_time_zone("UTC")
        return values.dt.strftime("%Y-%m-%dT%H:%M:%S")
    if values.dtype == pl.String and bool(values.str.contains(_NAIVE_ISO).fill_null(True).all()):
        return values  # already what csv_reader yields
    return pl.Series(values.name, [_iso(v) for v in values.to_list()], dtype=pl.String)


def entity_text(value: Any) -> str | None:
    """A message's text: a string, or Telegram's entity list (strings and `{"type", "text"}` objects) joined in
    order, exactly as a result.json message's text is read."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            p if isinstance(p, str) else str(p.get("text") or "") if isinstance(p, dict) else "" for p in value
        )
    return str(value)


def message_texts(values: pl.Series) -> pl.Series:
    """A message column -> String: entity lists (list of strings, or of structs with a `text` field) joined."""
    if values.dtype == pl.List:
        inner = values.dtype.inner  # type: ignore[attr-defined]
        if inner == pl.Struct and "text" in [f.name for f in inner.fields]:  # type: ignore[union-attr]
            values = values.list.eval(pl.element().struct.field("text").fill_null(""))
        values = values.list.eval(pl.element().cast(pl.String).fill_null("")).list.join("")
    return values.cast(pl.String, strict=False).fill_null("")


def _frame(df: pl.DataFrame, cols: dict[str, str], chat: int | str | None = None) -> pl.DataFrame:
    dtype = pl.Int64 if isinstance(chat, int) else pl.String
    out = {
        "channel_id": channel_ids(df[cols["channel_id"]])
        if chat is None
        else pl.Series([chat] * df.height, dtype=dtype),
        "date": dates(df[cols["date"]]),
        "message": message_texts(df[cols["message"]]),
    }
    if "id" in cols:
        out["id"] = df[cols["id"]].cast(pl.Int64, strict=False)
    if "forwarded_from" in cols:
        fwd = df[cols["forwarded_from"]]
        out["forwarded_from"] = (
            fwd if fwd.dtype == pl.String else pl.Series([forward_label(v) for v in fwd.to_list()], dtype=pl.String)
        )
    return pl.DataFrame(out)


def forward_label(value: Any) -> str | None:
    """Where a forward came from: a name, or a Telethon forward header's `from_name` or origin id; else None."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        if value.get("from_name"):
            return str(value["from_name"])
        origin = value.get("from_id")
        if isinstance(origin, dict):
            origin = next((origin[k] for k in _PEER_KEYS if k in origin), None)
        return str(origin) if origin is not None else "unknown"
    return str(value)


def _count_bad(df: pl.DataFrame, stats: ReadStats, path: str, where: str) -> pl.DataFrame:
    bad = df["channel_id"].is_null()
    n_bad = int(bad.sum())
    if n_bad:
        stats.bad(f"{path}: {where}", BAD_CHAT)
        stats.bad_rows += n_bad - 1
        df = df.filter(~bad)
    stats.rows += df.height
    return df


def _chat_for(cols: dict[str, str], chat: int | str | None, fallback: int | str | None) -> int | str | None:
    return chat if chat is not None else (fallback if "channel_id" not in cols else None)


def read_jsonl(
    f: BinaryIO,
    path: str,
    columns: dict[str, str],
    chunk_bytes: int,
    stats: ReadStats,
    header_only: bool = False,
    chat: int | str | None = None,
    fallback_chat: int | str | None = None,
) -> Iterator[pl.DataFrame]:
    """JSON Lines, one object a line, in chunks of about `chunk_bytes`; a malformed line names its number.
    `chat` is the chat of every line, `fallback_chat` that of every line of a file without a chat field."""
    cols: dict[str, str] | None = None
    rows: list[dict[str, Any]] = []
    size = line_no = first = 0
    for raw in _lines(f):
        line_no += 1
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FakegptError(f"{path}: line {line_no}: malformed JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise FakegptError(f"{path}: line {line_no}: expected a JSON object per line")
        if cols is None:
            cols = resolve(list(obj), columns, path, chat is not None or fallback_chat is not None)
            if chat is not None:
                cols.pop("channel_id", None)
            chat = stats.chat = _chat_for(cols, chat, fallback_chat)
            if header_only:
                return
        rows.append({k: obj.get(c) for k, c in cols.items()})
        size += len(raw)
        if size >= chunk_bytes:
            yield _count_bad(_frame(_rows_frame(rows), {k: k for k in cols}, chat), stats, path, f"lines {first + 1}-")
            rows, size, first = [], 0, line_no
    if cols is None:
        raise FakegptError(f"{path}: empty file (no JSON lines)")
    if rows:
        yield _count_bad(_frame(_rows_frame(rows), {k: k for k in cols}, chat), stats, path, f"lines {first + 1}-")


def _lines(f: BinaryIO) -> Iterator[bytes]:
    buf = b""
    while data := f.read(1 << 20):
        buf += data
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf


def _rows_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    data: dict[str, pl.Series] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "forwarded_from":
            data[key] = pl.Series(key, [forward_label(v) for v in values], dtype=pl.String)
            continue
        if key == "message":
            data[key] = pl.Series(key, [entity_text(v) for v in values], dtype=pl.String)
            continue
        if any(isinstance(v, dict) for v in values):
            # A peer object: keep the id it carries (Telethon `{"_": "PeerChannel", "channel_id": N}`)
            values = [next((v[k] for k in _PEER_KEYS if k in v), None) if isinstance(v, dict) else v for v in values]
        if key == "channel_id":
            ids = pl.Series(key, [_int(v) for v in values], dtype=pl.Int64)
            if ids.null_count() > sum(v is None for v in values):  # @usernames: as text
                ids = chat_ids(pl.Series(key, [None if v is None else str(v) for v in values], dtype=pl.String))
            data[key] = ids
        elif key == "id":
            data[key] = pl.Series(key, [_int(v) for v in values], dtype=pl.Int64)
        elif key == "date":
            data[key] = pl.Series(key, [_iso(v) for v in values], dtype=pl.String)
        else:
            data[key] = pl.Series(key, [None if v is None else str(v) for v in values], dtype=pl.String)
    return pl.DataFrame(data)


def _int(value: Any) -> int | None:
    try:
        return int(float(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def read_parquet(
    path: str,
    columns: dict[str, str],
    chunk_bytes: int,
    stats: ReadStats,
    header_only: bool = False,
    chat: int | str | None = None,
    fallback_chat: int | str | None = None,
) -> Iterator[pl.DataFrame]:
    """Parquet, one batch per slice of row groups (pyarrow), only the mapped columns read."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise FakegptError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
    cols = resolve(pf.schema_arrow.names, columns, path, chat is not None or fallback_chat is not None)
    if chat is not None:
        cols.pop("channel_id", None)
    chat = stats.chat = _chat_for(cols, chat, fallback_chat)
    if header_only:
        return
    rows_per_batch = max(1024, chunk_bytes // 512)  # ~16 k rows for 8 MiB: messages average a few hundred bytes
    for i, batch in enumerate(pf.iter_batches(batch_size=rows_per_batch, columns=sorted(set(cols.values())))):
        df = pl.from_arrow(batch)
        assert isinstance(df, pl.DataFrame)
        yield _count_bad(_frame(df, cols, chat), stats, path, f"batch {i + 1}")
