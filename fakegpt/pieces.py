r"""Encode many messages at once, running byte-pair merges once per distinct piece instead of once per word.

tiktoken encodes text in two steps: a regex splits it into pieces (a word with its leading space, a number, a
run of punctuation, whitespace), then byte-pair merges turn each piece into ids. A piece's ids depend on the
piece alone, and a corpus repeats the same pieces over and over, so `encode_messages`

1. splits all messages of a batch into pieces in one polars call (Rust regex, no Python loop),
2. numbers the pieces with a polars Categorical that lives as long as the `PieceEncoder` (one per prepare run),
3. has tiktoken encode each piece the first time it is seen, and remembers its ids,
4. gathers the ids of every piece in order, with EOT after each message.

Exactness: the ids must be tiktoken's, so the split must be tiktoken's.
- GPT-2's pattern ends in `\s+(?!\S)|\s+`, and Rust's regex crate has no look-ahead. The split here uses
  `\s+`, which cuts exactly where the original does whenever no two whitespace characters are adjacent: the
  look-ahead only decides how a run of two or more is divided. prepare's default cleaning collapses every
  run to one character.
- The classes `\p{L}`, `\p{N}` and `\s` come from Unicode tables compiled into each library. They agree
  today (a test checks every code point). So that a future build carrying another Unicode version cannot
  change a single id, only messages whose characters all lie in blocks whose letters and digits were
  settled decades ago (U+0000-U+036F: Latin with its accents; U+2000-U+20CF: punctuation and currency) take
  this path.
Every other message (a run of whitespace, another script) is encoded by tiktoken directly. Tests compare the
result with tiktoken on the real corpora, on every code point and on random text.
"""

from __future__ import annotations

import threading

import numpy as np
import polars as pl

from fakegpt.tokenizer import EOT_TOKEN, get_encoding

EOT_TEXT = "<|endoftext|>"
# tiktoken's GPT-2 pattern with `\s+(?!\S)|\s+` as `\s+` (identical when no two whitespace chars are adjacent).
PIECE_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"""
# Messages that go to tiktoken itself: adjacent whitespace, or a character outside the long-settled blocks.
NEEDS_TIKTOKEN = r"\s\s|[^\x00-\x{036F}\x{2000}-\x{20CF}]"
_ALLOWED = frozenset({EOT_TEXT})


def encode_messages(texts: pl.Series) -> np.ndarray:
    """GPT-2 ids of every message followed by EOT (50256), concatenated; equal to tiktoken's, as uint32.

    A message must not contain the text "<|endoftext|>" (it would read as a message boundary). To encode many
    batches, keep one `PieceEncoder`: it remembers the pieces of earlier batches.
    """
    return PieceEncoder().encode(texts)


def encode_joined(texts: pl.Series) -> np.ndarray:
    """tiktoken itself: the messages joined by the end-of-text text, which it encodes as EOT between pieces
    it encodes independently, so each message is encoded on its own."""
    joined = texts.str.join(EOT_TEXT).item() + EOT_TEXT
    return get_encoding().encode_to_numpy(joined, allowed_special=_ALLOWED)


class PieceEncoder:
    """Encodes batches of messages, remembering the ids of every distinct piece it has seen. Safe to call from
    several threads at once (prepare runs one per core)."""

    def __init__(self) -> None:
        self._dtype = pl.Categorical(pl.Categories.random())
        # Cast first, so the end-of-text piece is code 0; holding the Series keeps the mapping alive.
        self._sentinel = pl.Series([EOT_TEXT]).cast(self._dtype)
        if self._sentinel.to_physical()[0] != 0:
            raise RuntimeError("polars numbered the first category other than 0")
        self._eot_piece = pl.Series([[EOT_TEXT]], dtype=pl.List(self._dtype))
        self._lock = threading.Lock()
        # Code c's ids are ids[start[c] : start[c] + length[c]]; length 0: not seen yet. Arrays are replaced,
        # never shrunk, when they grow, so a reader holding an older one still finds every code it knew.
        self._ids = np.full(1 << 16, EOT_TOKEN, dtype=np.uint32)
        self._n_ids = 1
        self._start = np.zeros(1 << 14, dtype=np.int64)
        self._length = np.zeros(1 << 14, dtype=np.int64)
        self._length[0] = 1  # code 0 -> [EOT]

    def encode(self, texts: pl.Series) -> np.ndarray:
        """GPT-2 ids of every message followed by EOT, concatenated (uint32); equal to tiktoken's."""
        texts = texts.cast(pl.String).fill_null("")
        if len(texts) == 0:
            return np.zeros(0, dtype=np.uint32)
        if texts.str.contains(EOT_TEXT, literal=True).any():
            raise ValueError(f"a message contains the text {EOT_TEXT!r}, which would read as a message boundary")
        slow = texts.str.contains(NEEDS_TIKTOKEN)
        n_slow = int(slow.sum())
        if n_slow == 0:
            return self.encode_pieces(texts)
        if n_slow == len(texts):
            return encode_joined(texts)
        return _merge(slow.to_numpy(), self.encode_pieces(texts.filter(~slow)), encode_joined(texts.filter(slow)))

    def encode_pieces(self, texts: pl.Series) -> np.ndarray:
        """The piece path alone, for messages that need no look-ahead and lie in the settled blocks (`encode`
        checks that; tests call this directly to compare the Unicode tables on every code point)."""
        codes = (texts.str.extract_all(PIECE_PAT).cast(pl.List(self._dtype)).list.concat(self._eot_piece)
                 .explode().to_physical().to_numpy())
        with self._lock:
            self._learn(codes)
            ids, start, length = self._ids, self._start, self._length
        lengths = length[codes]
        starts = start[codes]
        # index = the positions in `ids` of every output token: runs start[c], start[c] + 1, ... per piece,
        # built as a cumulative sum of steps (1 inside a piece, a jump at each piece's first token).
        out_starts = np.cumsum(lengths) - lengths
        step = np.ones(int(out_starts[-1] + lengths[-1]), dtype=np.int64)
        step[0] = starts[0]
        step[out_starts[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
        return ids[np.cumsum(step)]

    def _learn(self, codes: np.ndarray) -> None:
        """Encode the pieces among `codes` not seen before (holding the lock)."""
        top = int(codes.max())
        if top >= len(self._length):
            size = max(2 * len(self._length), top + 1)
            self._start = _grown(self._start, size)
            self._length = _grown(self._length, size)
        new = np.unique(codes[self._length[codes] == 0])
        if not len(new):
            return
        categories = self._dtype.categories
        if len(new) > 10_000:  # copying every category beats a Python call per code
            texts = categories.to_series().gather(new)
        else:
            texts = pl.Series([categories[int(c)] for c in new], dtype=pl.String)
        ids = encode_joined(texts)
        ends = np.flatnonzero(ids == EOT_TOKEN)  # one after each piece's ids; a piece itself never holds EOT
        if len(ends) != len(new):
            raise RuntimeError(f"expected {len(new)} end-of-text tokens, found {len(ends)}")
        lengths = np.diff(ends, prepend=-1) - 1
        flat = np.delete(ids, ends)
        if self._n_ids + len(flat) > len(self._ids):
            self._ids = _grown(self._ids, max(2 * len(self._ids), self._n_ids + len(flat)))
        self._ids[self._n_ids:self._n_ids + len(flat)] = flat
        self._start[new] = self._n_ids + np.cumsum(lengths) - lengths
        self._length[new] = lengths
        self._n_ids += len(flat)


def _grown(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=a.dtype)
    out[:len(a)] = a
    return out


def _merge(slow: np.ndarray, fast_ids: np.ndarray, slow_ids: np.ndarray) -> np.ndarray:
    """Interleave the two streams back into message order (`slow`: which messages the second one holds)."""
    combined = np.concatenate((fast_ids, slow_ids))
    lengths = np.empty(len(slow), dtype=np.int64)
    starts = np.empty(len(slow), dtype=np.int64)
    for mask, ids, base in ((~slow, fast_ids, 0), (slow, slow_ids, len(fast_ids))):
        ends = np.flatnonzero(ids == EOT_TOKEN)
        n = np.diff(ends, prepend=-1)
        lengths[mask] = n
        starts[mask] = base + ends + 1 - n
    out_starts = np.cumsum(lengths) - lengths
    index = np.arange(int(lengths.sum())) + np.repeat(starts - out_starts, lengths)
    return combined[index]
