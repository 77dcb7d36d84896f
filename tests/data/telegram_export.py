"""Telegram Desktop exports built from the real messages of ../shared/data, with every message shape.

Each CSV message becomes one text-bearing message, in a shape chosen by its position: a plain string, a list of
strings and entity objects of every entity type (the parts join back to the exact message), with a forward,
an edit, a reply or a photo caption. Between them sit messages that carry no text to keep: service messages
(joins, pins, title changes), media-only messages (photo, sticker, voice, file) and an empty text. The text a
reader must recover for a chat is therefore exactly that chat's CSV messages, in order.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl

ENTITY_TYPES = (
    "bold",
    "italic",
    "underline",
    "strikethrough",
    "spoiler",
    "code",
    "pre",
    "link",
    "text_link",
    "mention",
    "mention_name",
    "hashtag",
    "cashtag",
    "bot_command",
    "email",
    "phone",
    "bank_card",
    "custom_emoji",
    "blockquote",
    "plain",
)
_SERVICE = ("join_group_by_link", "pin_message", "edit_group_title", "invite_members")
_MEDIA = (
    {"photo": "photos/photo_1.jpg", "width": 800, "height": 600},
    {"file": "stickers/sticker.webp", "media_type": "sticker", "sticker_emoji": "👍"},
    {"file": "voice/audio_1.ogg", "media_type": "voice_message", "mime_type": "audio/ogg", "duration_seconds": 3},
    {"file": "files/doc.pdf", "mime_type": "application/pdf"},
)


def unix(date: str) -> int:
    """The CSV's naive date read as UTC."""
    return int(dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc).timestamp())


def _entity(kind: str, text: str) -> dict[str, Any]:
    e: dict[str, Any] = {"type": kind, "text": text}
    if kind == "text_link":
        e["href"] = "https://example.org/x"
    elif kind == "mention_name":
        e["user_id"] = 4242
    elif kind == "custom_emoji":
        e["document_id"] = "5368324170671202286"
    elif kind == "pre":
        e["language"] = "python"
    elif kind == "blockquote":
        e["collapsed"] = False
    return e


def _text(message: str, i: int) -> tuple[Any, list[dict[str, Any]]]:
    """(text, text_entities): a plain string every third message, else a list that joins back to `message`."""
    if i % 3 == 0 or len(message) < 3:
        return message, [{"type": "plain", "text": message}]
    a, b = len(message) // 3, 2 * len(message) // 3
    kind = ENTITY_TYPES[(i // 3) % len(ENTITY_TYPES)]
    kind2 = ENTITY_TYPES[(i // 3 + 7) % len(ENTITY_TYPES)]
    if i % 3 == 1:
        parts: list[Any] = [message[:a], _entity(kind, message[a:b]), message[b:]]
    else:  # entities first and last, and an empty plain string between
        parts = [_entity(kind, message[:a]), "", message[a:b], _entity(kind2, message[b:])]
    entities = [p if isinstance(p, dict) else {"type": "plain", "text": p} for p in parts]
    return parts, entities


def chat_messages(df: pl.DataFrame, first_id: int = 1) -> list[dict[str, Any]]:
    """Messages of one chat from CSV rows (`date`, `message`), with non-text messages between them."""
    out: list[dict[str, Any]] = []
    mid = first_id
    for i, (date, message) in enumerate(zip(df["date"].to_list(), df["message"].to_list(), strict=True)):
        base = {"date": date, "date_unixtime": str(unix(date))}
        if i % 5 == 0:  # something without text first
            kind = (i // 5) % 6
            if kind < 4:
                extra = {"actor": "Maria", "actor_id": "user77", "action": _SERVICE[kind], "text": ""}
                extra |= {"message_id": mid - 1} if _SERVICE[kind] == "pin_message" else {}
                out.append({"id": mid, "type": "service", **base, **extra, "text_entities": []})
            elif kind == 4:
                media = _MEDIA[(i // 30) % len(_MEDIA)]
                out.append(
                    {"id": mid, "type": "message", **base, "from": "Ana", "from_id": "user9", **media}
                    | {
                        "text": "",
                        "text_entities": [],
                    }
                )
            else:
                out.append(
                    {"id": mid, "type": "message", **base, "from": "Ana", "from_id": "user9", "text": ""}
                    | {"text_entities": []}
                )
            mid += 1
        text, entities = _text(message, i)
        msg: dict[str, Any] = {"id": mid, "type": "message", **base, "from": "Canal", "from_id": "channel1"}
        if i % 4 == 1:
            msg["forwarded_from"] = f"Fonte {i % 3}"
        if i % 6 == 2:
            msg["edited"] = date
            msg["edited_unixtime"] = str(unix(date) + 60)
        if i % 7 == 3:
            msg["reply_to_message_id"] = mid - 1
        if i % 11 == 4:
            msg |= {"photo": "photos/p.jpg", "width": 10, "height": 10}  # a caption is the message's text
        msg |= {"text": text, "text_entities": entities}
        out.append(msg)
        mid += 1
    return out


def chat(df: pl.DataFrame, chat_id: int, name: str, kind: str = "public_channel") -> dict[str, Any]:
    return {"name": name, "type": kind, "id": chat_id, "messages": chat_messages(df)}


def account(chats: list[dict[str, Any]], left: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole-account export: chats under chats.list, left chats under left_chats.list, other sections around."""
    return {
        "about": "Here is the data you requested.",
        "personal_information": {"user_id": 1, "first_name": "Pesquisa", "phone_number": "+55 00", "bio": ""},
        "profile_pictures": [{"date": "2020-01-01T00:00:00", "photo": "profile_pictures/p.jpg"}],
        "contacts": {"about": "contacts", "list": [{"first_name": "A", "phone_number": "1", "date": "2020"}]},
        "frequent_contacts": {"about": "...", "list": [{"id": 5, "category": "people", "type": "user", "rating": 1}]},
        "chats": {"about": "This page lists all chats from this export.", "list": chats},
        "left_chats": {"about": "chats you have left", "list": left},
        "other_data": {"about": "...", "changes_log": [{"type": "x", "text": "not a message"}]},
    }


def write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
