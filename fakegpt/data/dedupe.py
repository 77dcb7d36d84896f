"""Duplicates and cross-source overlap, decided in time order once every message has been read.

A forward is a copy of an earlier message, so of several copies of a cleaned text the earliest in time is the
one kept, whatever order the file lists them in (a newest-first scrape keeps its oldest copy too). Between the
sources of a mixture the rule is `--overlap`: `first-in-time` keeps a text only in the source where it appears
first in time (ties: the source listed first), `first-read` only in the source read first.

The reader hands on every message with its 64-bit text hash and epoch time (16 bytes a message, never the
text), and these masks drop the copies when the bins are assembled; one sort in polars, no Python loop.
"""

from __future__ import annotations

import numpy as np
import polars as pl

RULES = ("first-in-time", "first-read")
NO_TIME = np.iinfo(np.int64).max  # a message without a readable date counts as the latest


def epoch_seconds(dates: pl.Series) -> np.ndarray:
    """ISO 8601 dates (`YYYY-MM-DD[THH:MM[:SS]]`, as every reader yields them) -> int64 epoch seconds."""
    s = dates.cast(pl.String).str.strip_chars().str.replace(" ", "T", literal=True)
    t = s.str.slice(0, 19).str.to_datetime("%Y-%m-%dT%H:%M:%S", strict=False)
    if t.null_count() > s.null_count():  # minutes or days only: parsed only where a file has them
        minutes = s.str.slice(0, 16).str.to_datetime("%Y-%m-%dT%H:%M", strict=False)
        day = s.str.slice(0, 10).str.to_datetime("%Y-%m-%d", strict=False)
        t = t.fill_null(minutes).fill_null(day)
    return t.dt.epoch("s").fill_null(NO_TIME).to_numpy().astype(np.int64)


def find(
    hashes: list[np.ndarray], times: list[np.ndarray], names: list[str], overlap: str = "first-in-time"
) -> tuple[list[np.ndarray], int, dict[str, int]]:
    """Per source, a mask of the messages to drop; how many were repeats within their source; and the copies
    dropped by the overlap rule per pair "KEPT_IN>DROPPED_FROM" (several sources only).

    `hashes[i]`, `times[i]`: source i's messages in read order. Ties in time keep the copy read first.
    """
    sizes = [len(h) for h in hashes]
    drop = [np.zeros(n, dtype=bool) for n in sizes]
    if not sum(sizes):
        return drop, 0, {}
    df = pl.DataFrame(
        {
            "h": np.concatenate(hashes).astype(np.uint64),
            "t": np.concatenate(times).astype(np.int64),
            "src": np.repeat(np.arange(len(sizes), dtype=np.int32), sizes),
        }
    ).with_row_index("g")  # read order: source by source
    losers = pl.DataFrame(schema={"g": pl.UInt32, "src": pl.Int32, "winner": pl.Int32})
    if len(sizes) > 1 and overlap == "first-read":
        df = df.with_columns(winner=pl.col("src").min().over("h"))
        losers = df.filter(pl.col("src") != pl.col("winner")).select("g", "src", "winner")
        df = df.filter(pl.col("src") == pl.col("winner"))
    df = df.sort("t", "g")
    first = pl.struct("h", "src").is_first_distinct() if len(sizes) > 1 else pl.col("h").is_first_distinct()
    df = df.with_columns(first=first)
    repeats = df.filter(~pl.col("first"))["g"]
    if len(sizes) > 1 and overlap == "first-in-time":
        kept = df.filter("first").with_columns(winner=pl.col("src").first().over("h"))
        losers = kept.filter(pl.col("src") != pl.col("winner")).select("g", "src", "winner")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    flat = np.zeros(int(starts[-1]), dtype=bool)
    flat[repeats.to_numpy()] = True
    flat[losers["g"].to_numpy()] = True
    drop = [flat[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    pairs = {
        f"{names[w]}>{names[s]}": int(n)
        for w, s, n in losers.group_by("winner", "src").len().sort("winner", "src").iter_rows()
    }
    return drop, len(repeats), pairs
