"""Chat identities: the bare integer id of a Telegram chat, or its public `@username`.

The Bot API "marks" a channel or supergroup id (-100 followed by the bare id, the desktop export's `id`); both
spellings name the same chat everywhere. Scrapes of public channels often name the chat by username instead
(`@AwasMart`, `AwasMart`, a t.me link); that is kept as text, `@` first, as the file spells it.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from fakegpt.errors import FakegptError

MARKED_OFFSET = 1_000_000_000_000
# A chat named by its public username, as scrapes often do: `@AwasMart`, `AwasMart` or a t.me link.
USERNAME = r"^\s*(?:@|(?:https?://)?t(?:elegram)?\.me/)?([A-Za-z]\w{3,31})/?\s*$"


def bare_channel_id(channel_id: int) -> int:
    """-1001234567890 -> 1234567890; any other id unchanged (so both spellings select the same chat)."""
    return -channel_id - MARKED_OFFSET if channel_id <= -MARKED_OFFSET else channel_id


def bare_channel_expr(col: str = "channel_id") -> pl.Expr:
    """`bare_channel_id` as a polars expression over an Int64 column."""
    c = pl.col(col)
    return pl.when(c <= -MARKED_OFFSET).then(-c - MARKED_OFFSET).otherwise(c)


def chat_id(value: Any, where: str) -> int | str:
    """A chat as a user names it -> the bare integer id, or `@username` (text, as the file spells it)."""
    text = str(value).strip()
    try:
        return bare_channel_id(int(text))
    except ValueError:
        pass
    name = pl.Series([text]).str.extract(USERNAME, 1).item()
    if name is None:
        raise FakegptError(f"{where}: expected an integer chat id or a @username, got {value!r}")
    return f"@{name}"


def chat_ids(values: pl.Series) -> pl.Series:
    """A chat column (String) -> String identities: bare integer ids, `@username`s; null where neither."""
    ids = values.str.strip_chars().cast(pl.Int64, strict=False)
    if ids.null_count() == values.null_count():  # the usual case: every chat an integer
        return _bare_text(ids)
    names = values.str.extract(USERNAME, 1)
    return _bare_text(ids).fill_null("@" + names)


def _bare_text(ids: pl.Series) -> pl.Series:
    return pl.DataFrame({"c": ids}).select(bare_channel_expr("c").cast(pl.String))["c"].alias(ids.name)


def chat_keys(channel_ids: list[int | str]) -> list[str]:
    """What a channel filter compares: ids as text, usernames without `@` and lower-cased (Telegram's are
    case-insensitive)."""
    return [str(c).lstrip("@").lower() for c in channel_ids]
