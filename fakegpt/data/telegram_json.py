"""Read Telegram Desktop's machine-readable export (`result.json`) in bounded-memory batches.

Two layouts, told apart by content:

- per-chat export ("Export chat history"): one object `{"name", "type", "id", "messages": [...]}`;
- whole-account export ("Export Telegram data"): chat objects of that shape under `chats.list` and, for chats
  the user has left, `left_chats.list`, beside other sections (`personal_information`, `contacts`, ...).

The file is streamed with ijson (yajl's C parser): one pass over the parse events, only the fields prepare
needs are kept, and messages are handed on in polars batches of `chunk_bytes` of text, so memory stays flat on
any export size. Each batch has the columns csv_reader yields (`channel_id` Int64, `date` String, `message`
String) plus `id` (the message id) and `forwarded_from` (the display name a forward came from, else null).

A message's text is its `text` field: a string, or a list of strings and entity objects
(`{"type": "bold", "text": ...}`) whose texts are joined in order. `type: service` messages (joins, pins, title
changes) and messages without text (media only, or empty) are dropped and counted by reason. `date_unixtime`
(UTC epoch seconds, a string) becomes `date` as ISO 8601 UTC; exports older than that field keep `date`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
from collections import Counter
from collections.abc import Iterator
from typing import Any, BinaryIO

import ijson
import polars as pl

from fakegpt.errors import FakegptError

FORMAT = "telegram-json"
CHAT_TYPES = (
    "public_channel",
    "private_channel",
    "public_supergroup",
    "private_supergroup",
    "private_group",
    "personal_chat",
    "bot_chat",
    "saved_messages",
)
# Keys whose presence makes a message without text "media only" rather than "empty".
MEDIA_KEYS = frozenset(
    {"photo", "file", "media_type", "sticker_emoji", "location_information", "poll", "contact_information"}
    | {"place_name", "game_title", "invoice_information", "live_location_period_seconds", "mime_type"}
)
DROP_REASONS = ("service", "media_only", "empty_text", "chat_type")
# Exports larger than this are parsed in a child process: the parse is Python work per JSON event, which would
# otherwise hold the GIL that prepare's tokenizer threads need (the child costs ~1 s to start).
CHILD_PROCESS_BYTES = 32 << 20
TOP_FORWARD_SOURCES = 10  # forward origins listed per chat in meta.json
# Where chat objects sit: the root of a per-chat export, the two lists of a whole-account export.
_ROOTS = {"": "", "chats.list.item": "chats.list.item.", "left_chats.list.item": "left_chats.list.item."}

# Event dispatch: prefix -> (code, chat root). One dict lookup per parse event; unknown prefixes are skipped.
_CHAT, _NAME, _TYPE, _ID, _MSG, _M_ID, _M_TYPE, _M_UNIX, _M_DATE, _M_TEXT, _M_PART, _M_ENTITY, _M_FWD = range(13)
_TABLE: dict[str, tuple[int, str]] = {}
for _root, _p in _ROOTS.items():
    _m = _p + "messages.item"
    _TABLE.update(
        {
            _root: (_CHAT, _root),
            _p + "name": (_NAME, _root),
            _p + "type": (_TYPE, _root),
            _p + "id": (_ID, _root),
            _m: (_MSG, _root),
            _m + ".id": (_M_ID, _root),
            _m + ".type": (_M_TYPE, _root),
            _m + ".date_unixtime": (_M_UNIX, _root),
            _m + ".date": (_M_DATE, _root),
            _m + ".text": (_M_TEXT, _root),
            _m + ".text.item": (_M_PART, _root),
            _m + ".text.item.text": (_M_ENTITY, _root),
            _m + ".forwarded_from": (_M_FWD, _root),
        }
    )


@dataclasses.dataclass
class Chat:
    """One chat as meta.json records it."""

    id: int | None = None
    name: str | None = None
    type: str | None = None
    left: bool = False  # from `left_chats` (a chat the account has left)
    messages: int = 0  # message objects read
    kept: int = 0  # with text, handed on to cleaning
    forwards: int = 0  # kept messages that are forwards
    dropped: Counter[str] = dataclasses.field(default_factory=Counter)
    forwarded_from: Counter[str] = dataclasses.field(default_factory=Counter)

    def record(self) -> dict[str, Any]:
        """This chat's line in meta.json: id, name, type, whether left, counts, forwards and their top sources."""
        top = self.forwarded_from.most_common(TOP_FORWARD_SOURCES)
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "left": self.left,
            "messages": self.messages,
            "kept": self.kept,
            "dropped": {k: int(self.dropped.get(k, 0)) for k in DROP_REASONS},
            "forwards": self.forwards,
            "forwarded_from": dict(top),
        }


def looks_like_json(head: bytes) -> bool:
    """True when the first non-blank byte (after a BOM) opens a JSON object or array: JSON, not a CSV."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[")


class _Batch:
    """Column lists of the messages not yet handed on."""

    def __init__(self) -> None:
        self.ids: list[int | None] = []
        self.chan: list[int | None] = []
        self.unix: list[int | None] = []
        self.date: list[str | None] = []
        self.text: list[str] = []
        self.fwd: list[str | None] = []
        self.chars = 0

    def __len__(self) -> int:
        return len(self.text)

    def truncate(self, n: int) -> None:
        for col in (self.ids, self.chan, self.unix, self.date, self.text, self.fwd):
            del col[n:]

    def frame(self) -> pl.DataFrame:
        unix = pl.Series("unix", self.unix, dtype=pl.Int64)
        iso = pl.from_epoch(unix, time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S")
        return pl.DataFrame(
            {
                "id": pl.Series(self.ids, dtype=pl.Int64),
                "channel_id": pl.Series(self.chan, dtype=pl.Int64),
                "date": iso.fill_null(pl.Series(self.date, dtype=pl.String)),
                "message": pl.Series(self.text, dtype=pl.String),
                "forwarded_from": pl.Series(self.fwd, dtype=pl.String),
            }
        )


class _Counting:
    """Counts the bytes ijson has pulled from the file (for error offsets and the progress bar)."""

    def __init__(self, f: BinaryIO):
        self.f, self.count = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data


def check_export(f: BinaryIO, path: str) -> None:
    """Fail fast (before a tracking run starts) on JSON that is not a Telegram export: read the top-level keys
    until one that holds messages (`messages`, `chats`, `left_chats`) shows up; the rest is left unread."""
    src = _Counting(f)
    keys: list[str] = []
    try:
        for prefix, event, value in ijson.parse(src, buf_size=1 << 16):
            if prefix == "" and event == "map_key":
                if value in ("messages", "chats", "left_chats"):
                    return
                keys.append(value)
            elif prefix == "" and event == "start_array":
                break  # (an end_map goes on: bytes after the object mean JSON Lines, reported below)
    except ijson.JSONError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FakegptError(
            f"{path}: malformed or truncated JSON near byte {src.count} ({detail[:120]}); "
            "if it holds one JSON object per line, use --format jsonl"
        ) from None
    shown = ", ".join(sorted(keys)[:8]) or "none (the top level is not an object)"
    raise FakegptError(
        f"{path}: not a Telegram Desktop export (expected `messages` or `chats.list` at the top level; "
        f"top-level keys: {shown})"
    )


def read_export(
    f: BinaryIO,
    path: str,
    chunk_bytes: int = 8 << 20,
    chat_types: frozenset[str] | None = None,
    chats: list[dict[str, Any]] | None = None,
    on_progress: Any = None,
) -> Iterator[pl.DataFrame]:
    """Yield message batches from an export read from binary stream `f`; `path` names it in errors.

    `chat_types` keeps only chats of those types. Each finished chat's record (see `Chat.record`) is appended
    to `chats`. `on_progress()` is called before each batch is yielded (the caller updates its byte count).
    """
    src = _Counting(f)
    batch = _Batch()
    chat: Chat | None = None
    pending = -1  # index in `batch` where the current chat's messages start while its id (or type) is unknown
    root_keys: set[str] = set()
    found_chat = False
    last: tuple[Any, Any] | None = None  # (message id, chat) of the last message read, for error messages
    m_id = m_type = m_unix = m_date = m_text = m_fwd = None
    parts: list[str] | None = None
    media = has_messages = False
    chats = chats if chats is not None else []

    def ready(c: Chat) -> bool:
        return c.id is not None and (chat_types is None or c.type is not None)

    try:
        for prefix, event, value in ijson.parse(src, use_float=True, buf_size=1 << 16):
            hit = _TABLE.get(prefix)
            if hit is None:
                continue
            code, root = hit
            if code == _MSG:
                if event == "map_key":
                    if value in MEDIA_KEYS:
                        media = True
                elif event == "start_map":
                    m_id = m_type = m_unix = m_date = m_text = m_fwd = parts = None
                    media = False
                elif event == "end_map":
                    assert chat is not None
                    chat.messages += 1
                    last = (m_id, chat.name or chat.id)
                    if parts is not None:
                        m_text = "".join(parts)
                    if m_type == "service":
                        chat.dropped["service"] += 1
                    elif not m_text:
                        chat.dropped["media_only" if media else "empty_text"] += 1
                    elif pending < 0 and chat_types is not None and chat.type not in chat_types:
                        chat.dropped["chat_type"] += 1
                    else:
                        chat.kept += 1
                        if m_fwd:
                            chat.forwards += 1
                            chat.forwarded_from[m_fwd] += 1
                        batch.ids.append(m_id)
                        batch.chan.append(chat.id)
                        batch.unix.append(m_unix)
                        batch.date.append(m_date)
                        batch.text.append(m_text)
                        batch.fwd.append(m_fwd)
                        batch.chars += len(m_text)
                        if pending < 0 and batch.chars >= chunk_bytes:
                            if on_progress:
                                on_progress()
                            yield batch.frame()
                            batch = _Batch()
            elif code == _M_TEXT:
                if event == "string":
                    m_text = value
                elif event == "start_array":
                    parts = []
            elif code == _M_PART or code == _M_ENTITY:
                if event == "string" and parts is not None:
                    parts.append(value)
            elif code == _M_UNIX:
                m_unix = _int(value)
            elif code == _M_ID:
                m_id = _int(value)
            elif code == _M_TYPE:
                m_type = value
            elif code == _M_DATE:
                m_date = value if isinstance(value, str) else None
            elif code == _M_FWD:
                m_fwd = value if isinstance(value, str) else None
            elif code == _CHAT:
                if event == "start_map":
                    chat = Chat(left=root.startswith("left_"))
                    pending, has_messages = -1, False
                elif event == "map_key":
                    if root == "":
                        root_keys.add(value)
                    if value == "messages":
                        found_chat = has_messages = True
                        if not ready(chat):  # type: ignore[arg-type]
                            pending = len(batch)
                elif event == "end_map" and chat is not None:
                    if not has_messages:  # the root of a whole-account export, or a chat with no messages key
                        chat = None
                        continue
                    if chat.id is None:
                        raise FakegptError(f"{path}: chat {chat.name!r} has no `id` (needed as its channel_id)")
                    if pending >= 0:  # the id (or type) came after the messages: settle them now
                        if chat_types is not None and chat.type not in chat_types:
                            chat.dropped["chat_type"] += len(batch) - pending
                            chat.kept -= len(batch) - pending
                            batch.truncate(pending)
                        else:
                            batch.chan[pending:] = [chat.id] * (len(batch) - pending)
                        pending = -1
                    chats.append(chat.record())
                    chat = None
            elif code == _NAME:
                if chat is not None and isinstance(value, str):
                    chat.name = value
            elif code == _TYPE:
                if chat is not None and isinstance(value, str):
                    chat.type = value
            elif code == _ID:
                if chat is not None and event == "number":
                    chat.id = _int(value)
    except ijson.JSONError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        after = f" after message id {last[0]} of chat {last[1]!r}" if last else ""
        hint = "" if found_chat else "; if it holds one JSON object per line, use --format jsonl"
        raise FakegptError(
            f"{path}: malformed or truncated JSON near byte {src.count}{after} ({detail[:120]}){hint}"
        ) from None
    except UnicodeDecodeError as exc:
        raise FakegptError(f"{path}: invalid UTF-8 near byte {src.count} ({exc.reason})") from None
    if not found_chat:
        keys = ", ".join(sorted(root_keys)[:8]) or "none (the top level is not an object)"
        raise FakegptError(
            f"{path}: not a Telegram Desktop export (expected `messages` or `chats.list` at the top level; "
            f"top-level keys: {keys})"
        )
    if len(batch):
        if on_progress:
            on_progress()
        yield batch.frame()


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _child(path: str, chunk_bytes: int, chat_types: frozenset[str] | None, q: Any) -> None:
    """In a child process: parse the export and put ("batch", frame, bytes read) items, then ("done", chats,
    sha256, bytes) or ("error", message) on `q`."""
    from fakegpt.data.csv_reader import _open

    try:
        with open(path, "rb") as raw:
            stream, hashing = _open(path, raw)  # type: ignore[arg-type]
            chats: list[dict[str, Any]] = []
            for df in read_export(stream, path, chunk_bytes, chat_types, chats):
                q.put(("batch", df, hashing.count))
            q.put(("done", chats, hashing.finish(), hashing.count))
    except FakegptError as exc:
        q.put(("error", str(exc)))
    except Exception as exc:  # noqa: BLE001 (handed to the parent, which names the file)
        q.put(("error", f"{path}: {type(exc).__name__}: {exc}"))


def read_export_in_child(
    path: str, chunk_bytes: int, chat_types: frozenset[str] | None, stats: Any
) -> Iterator[pl.DataFrame]:
    """`read_export` run in a child process (so the parse runs beside the tokenizer, not under its GIL); fills
    `stats.bytes_read`, `stats.chats` and `stats.sha256`. Stopping early ends the child."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads running
    q = ctx.Queue(maxsize=2)
    proc = ctx.Process(target=_child, args=(path, chunk_bytes, chat_types, q), daemon=True)
    proc.start()
    try:
        while True:
            try:
                item = q.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    raise FakegptError(f"{path}: the JSON reader process ended (exit code {proc.exitcode})") from None
                continue
            if item[0] == "batch":
                stats.bytes_read = item[2]
                yield item[1]
            elif item[0] == "done":
                stats.chats.extend(item[1])
                stats.sha256, stats.bytes_read = item[2], item[3]
                return
            else:
                raise FakegptError(item[1])
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join()
        q.close()
