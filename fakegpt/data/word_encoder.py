r"""Encode many messages at once, running tiktoken once per distinct word instead of once per occurrence.

tiktoken encodes text in two steps: a regex splits it into pieces (a word with its leading space, a number, a
run of punctuation, a whitespace character), then byte-pair merges turn each piece into ids. A corpus repeats
the same words over and over, so `PieceEncoder`

1. splits every message of a batch at its spaces, in one polars call (`str.split(" ")`, no Python loop);
   each part is a *word*: its leading space and what follows up to the next space ("vacina,", "2021\nA");
2. numbers the words with a polars Categorical that lives as long as the encoder (prepare keeps one until
   it has learnt 250,000 words, so memory stays flat),
3. has tiktoken encode each word the first time it is seen, and remembers its ids,
4. gathers the ids of every word in order, with EOT after each message.

Exactness: the ids equal tiktoken's on the whole message, because in a text where no two whitespace
characters are adjacent every space starts a new GPT-2 piece (the pattern only ever puts a space at the front
of a piece, or alone at the very end), and a piece never looks past the next space; so cutting before each
space never cuts a piece, and tiktoken splits each word into the same pieces it would find in the message.
prepare's default cleaning collapses whitespace, so nearly every message qualifies. A message with two
adjacent whitespace characters (where GPT-2's look-ahead `\s+(?!\S)` divides the run) is encoded by tiktoken
directly. Tests compare with tiktoken on the real corpora, on every Unicode code point and on random text.
"""

from __future__ import annotations

import threading

import numpy as np
import polars as pl

from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding

EOT_TEXT = "<|endoftext|>"
# Messages that go to tiktoken itself: adjacent whitespace, or the marker NUL (see `encode_words`).
NEEDS_TIKTOKEN = r"\s\s|\x00"
_FIRST = "\x00"  # marks a message's first word, which has no leading space
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
    """Encodes batches of messages, remembering the ids of every distinct word it has seen. Safe to call from
    several threads at once (prepare runs one per core)."""

    def __init__(self) -> None:
        self._dtype = pl.Categorical(pl.Categories.random())
        # Cast first, so the end-of-text marker is code 0; holding the Series keeps the mapping alive.
        self._sentinel = pl.Series([EOT_TEXT]).cast(self._dtype)
        if self._sentinel.to_physical()[0] != 0:
            raise RuntimeError("polars numbered the first category other than 0")
        self._eot_word = pl.Series([[EOT_TEXT]], dtype=pl.List(self._dtype))
        self._lock = threading.Lock()
        # Code c's ids are ids[start[c] : start[c] + length[c]]; length -1: not seen yet (0: a word with no
        # ids, the empty first word of a message that starts with a space). Arrays are replaced, never
        # shrunk, when they grow, so a reader holding an older one still finds every code it knew.
        self._ids = np.full(1 << 16, EOT_TOKEN, dtype=np.uint32)
        self._n_ids = 1
        self.words = 0  # distinct words learnt so far
        self._start = np.zeros(1 << 14, dtype=np.int64)
        self._length = np.full(1 << 14, -1, dtype=np.int64)
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
            return self.encode_words(texts)
        if n_slow == len(texts):
            return encode_joined(texts)
        return _merge(slow.to_numpy(), self.encode_words(texts.filter(~slow)), encode_joined(texts.filter(slow)))

    def encode_words(self, texts: pl.Series) -> np.ndarray:
        """The word path alone, for messages without adjacent whitespace or NUL (`encode` checks that; tests
        call this directly on every code point)."""
        # NUL before each message marks its first word, which is encoded without a leading space.
        words = (_FIRST + texts).str.split(" ").cast(pl.List(self._dtype)).list.concat(self._eot_word)
        codes = words.explode().to_physical().to_numpy()
        with self._lock:
            self._learn(codes)
            ids, start, length = self._ids, self._start, self._length
        lengths = length[codes]
        keep = lengths > 0
        if not keep.all():
            codes, lengths = codes[keep], lengths[keep]
        return _runs(ids, start[codes], lengths)

    def _learn(self, codes: np.ndarray) -> None:
        """Encode the words among `codes` not seen before (holding the lock)."""
        top = int(codes.max())
        if top >= len(self._length):
            size = max(2 * len(self._length), top + 1)
            self._start = _grown(self._start, size)
            self._length = _grown(self._length, size, fill=-1)
        new = np.unique(codes[self._length[codes] < 0])
        if not len(new):
            return
        categories = self._dtype.categories
        if len(new) > 10_000:  # copying every category beats a Python call per code
            words = categories.to_series().gather(new)
        else:
            words = pl.Series([categories[int(c)] for c in new], dtype=pl.String)
        w = pl.col("w")
        texts = (
            pl.DataFrame({"w": words})
            .select(pl.when(w.str.starts_with(_FIRST)).then(w.str.slice(1)).otherwise(pl.lit(" ") + w))
            .to_series()
        )
        ids = encode_joined(texts)
        ends = np.flatnonzero(ids == EOT_TOKEN)  # one after each word's ids; a word itself never holds EOT
        if len(ends) != len(new):
            raise RuntimeError(f"expected {len(new)} end-of-text tokens, found {len(ends)}")
        lengths = np.diff(ends, prepend=-1) - 1
        flat = np.delete(ids, ends)
        if self._n_ids + len(flat) > len(self._ids):
            self._ids = _grown(self._ids, max(2 * len(self._ids), self._n_ids + len(flat)))
        self._ids[self._n_ids : self._n_ids + len(flat)] = flat
        self._start[new] = self._n_ids + np.cumsum(lengths) - lengths
        self._length[new] = lengths
        self._n_ids += len(flat)
        self.words += len(new)


def _grown(a: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    out = np.full(size, fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


def _runs(source: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """source[starts[0] : starts[0] + lengths[0]], then the next run, ..., concatenated (every length >= 1).

    The index is a cumulative sum of steps: 1 inside a run, a jump to the next run's start at its first element.
    """
    out_starts = np.cumsum(lengths) - lengths
    step = np.ones(int(out_starts[-1] + lengths[-1]), dtype=np.int64)
    step[0] = starts[0]
    step[out_starts[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return source[np.cumsum(step)]


def _merge(slow: np.ndarray, fast_ids: np.ndarray, slow_ids: np.ndarray) -> np.ndarray:
    """Interleave the two streams back into message order (`slow`: which messages the second one holds)."""
    lengths = np.empty(len(slow), dtype=np.int64)
    starts = np.empty(len(slow), dtype=np.int64)
    for mask, ids, base in ((~slow, fast_ids, 0), (slow, slow_ids, len(fast_ids))):
        ends = np.flatnonzero(ids == EOT_TOKEN)  # each message ends with EOT, so every length is >= 1
        n = np.diff(ends, prepend=-1)
        lengths[mask] = n
        starts[mask] = base + ends + 1 - n
    return _runs(np.concatenate((fast_ids, slow_ids)), starts, lengths)
