"""`fakegpt prepare`: Telegram exports -> cleaned token bins (train.bin, val.bin, meta.json).

Inputs: CSV (well-formed or naive), Telegram Desktop's JSON export (per chat or whole account), and collectors'
JSON Lines / Parquet tables with a column map (fakegpt.data.readers picks the reader).

Pipeline, streamed in batches so memory stays flat however large the input:

    reader thread:  batch (readers) -> channel filter -> clean (polars) -> drop short -> dedupe -> split flag
    main thread:    batch -> parts of thousands of messages -> an encoder on a thread pool -> uint16/uint32 file

Each message is tokenized on its own and followed by EOT. With the default `--tokenizer gpt2` the ids equal
tiktoken's GPT-2 ids, EOT is 50256, and `word_encoder.PieceEncoder` runs tiktoken once per distinct word rather
than once per occurrence; cleaning guarantees the text "<|endoftext|>" never occurs inside a message. Any other
`--tokenizer` (a Hugging Face tokenizer folder or cached hub name, fakegpt.data.hf_tokenizer) encodes with the
`tokenizers` library's batch encoding, no special tokens added, its EOS id after each message; cleaning removes
the texts of its special tokens; the bins are uint32 when its vocabulary exceeds 65,536 ids.

Tokens go to a per-source scratch file first; the sequential split (which needs the final message count) and
the mixture draw then pick messages by index, and train.bin / val.bin are assembled under temporary names and
renamed at the end.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from fakegpt import __version__, config, tracking
from fakegpt.data import bins, dedupe, demo, hf_tokenizer, readers, spelling, telegram_json, tokenizer, word_encoder
from fakegpt.data import sources as data_sources
from fakegpt.data.chats import bare_channel_expr, bare_channel_id, chat_id, chat_keys
from fakegpt.data.clean import CleanRules, clean_expr
from fakegpt.data.csv_reader import ReadStats
from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.data.readers import FORMATS
from fakegpt.data.tables import parse_columns
from fakegpt.data.telegram_json import CHAT_TYPES, DROP_REASONS
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, output_dir

log = logging.getLogger(__name__)

SPLITS = ("sequential", "random", "date")
OVERLAP_RULES = ("first-in-time", "first-read")
OUTPUT_FILES = ("train.bin", "val.bin", META_FILE)
DTYPE = np.uint16  # GPT-2's bins
_CHUNK_MESSAGES = 2000  # messages per tokenizer call: big enough that thread-pool overhead vanishes
_MAX_CACHED_WORDS = 250_000  # distinct words the tokenizer remembers (~70 MB at most) before it starts afresh
_ASSEMBLE_TOKENS = 1 << 23  # tokens read at once when copying scratch files into train.bin / val.bin


@dataclasses.dataclass
class PrepareConfig:
    """`fakegpt prepare` settings: inputs or sources, cleaning, split, mixture, output folder."""

    inputs: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "positional": True,
            "help": "Telegram exports: CSV, Telegram Desktop result.json, JSON Lines or Parquet (files or globs, "
            ".gz allowed); none: the embedded demo data",
        },
    )
    out: str = dataclasses.field(default="out/prepared", metadata={"help": "output folder"})
    force: bool = dataclasses.field(default=False, metadata={"help": "overwrite an existing prepared dataset"})
    name: str = dataclasses.field(
        default="",
        metadata={"help": "dataset name for tracking (default: the --config file name, else the output folder name)"},
    )
    sources: list[Any] = dataclasses.field(
        default_factory=list,
        metadata={"help": "(dataset YAML) list of {name, path, channel_ids, fraction}; path is a file, glob or demo:"},
    )
    mix: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "target train-token fractions: NAME=FRACTION (a source of the YAML) or PATH=FRACTION"},
    )
    channel_ids: list[Any] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "keep only these chats (plain runs; sources set their own): ids or @usernames; a Bot API "
            "marked id (-100 followed by the id) selects the same chat as the bare id"
        },
    )
    channel_id: str = dataclasses.field(
        default="",
        metadata={
            "help": "tables (CSV, JSON Lines, Parquet): the chat of every message, an id or a @username, for a "
            "scrape of one channel (its chat column, if any, is then not read); default: a file without a chat "
            "column is the chat named by its file name (AwasMart.csv: AwasMart)"
        },
    )
    format: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "input format: auto (by extension, then content), csv (RFC 4180), naive (message column not "
            "quoted), telegram-json (Telegram Desktop result.json), jsonl or parquet"
        },
    )
    columns: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "the table's own column names: FIELD=COLUMN for id, channel_id, date, message and "
            "forwarded_from (e.g. message=text,channel_id=peer_id); CSV, JSON Lines and Parquet"
        },
    )
    chat_types: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": f"Telegram JSON: keep only chats of these types ({', '.join(CHAT_TYPES)}); none: all"},
    )
    remove_mentions: bool = dataclasses.field(default=True, metadata={"help": "remove @usernames"})
    remove_urls: bool = dataclasses.field(default=True, metadata={"help": "remove http(s):// and www. URLs"})
    remove_symbols: bool = dataclasses.field(
        default=True,
        metadata={"help": "remove characters other than letters, digits, whitespace and basic punctuation (emoji go)"},
    )
    collapse_whitespace: bool = dataclasses.field(default=True, metadata={"help": "collapse runs of whitespace"})
    keep_newlines: bool = dataclasses.field(
        default=True, metadata={"help": "when collapsing whitespace, keep one newline where a message had line breaks"}
    )
    spelling: str = dataclasses.field(
        default="none",
        metadata={"help": "spelling normalisation with Enelvo's lexicons (optional extra): none, slang or enelvo"},
    )
    min_chars: int = dataclasses.field(
        default=3, metadata={"help": "drop messages shorter than this many characters after cleaning"}
    )
    max_train_tokens: int = dataclasses.field(
        default=0,
        metadata={
            "help": "mixtures: at most this many train tokens (0: the most the scarcest source allows); one cap for "
            "every dose of a series keeps the size fixed while the share changes"
        },
    )
    dedupe: bool = dataclasses.field(
        default=True, metadata={"help": "drop exact duplicates of an earlier cleaned message (forwards)"}
    )
    overlap: str = dataclasses.field(
        default="first-in-time",
        metadata={
            "help": "mixtures with dedupe: a cleaned message in several sources stays only in the source where it "
            "appears first in time (first-in-time), or in the source read first (first-read, the old rule); "
            "meta.json's overlap and the data/overlap/KEPT/DROPPED metrics count the copies per source pair"
        },
    )
    val_mix: str = dataclasses.field(
        default="shared",
        metadata={
            "help": "mixtures: shared = val.bin is every source's whole held-out part, the same bins at every dose "
            "of a series (one yardstick), plus val_<source>.bin per source | dose = val drawn at the mixture's "
            "fractions (the old rule: each dose measured on its own distribution)"
        },
    )
    split: str = dataclasses.field(
        default="sequential",
        metadata={"help": "sequential (last val_fraction of messages), random (seeded) or date (>= split_date is val)"},
    )
    val_fraction: float = dataclasses.field(
        default=1 / 11, metadata={"help": "share of messages in val for sequential and random splits (10:1 train:val)"}
    )
    split_date: str = dataclasses.field(
        default="",
        metadata={"help": "ISO date (YYYY-MM-DD[THH:MM:SS]); with --split date, messages on or after it go to val"},
    )
    seed: int = dataclasses.field(default=1337, metadata={"help": "seed for the random split and mixture draws"})
    tokenizer: str = dataclasses.field(
        default=hf_tokenizer.GPT2,
        metadata={
            "help": "gpt2 (the bundled GPT-2 BPE), a folder holding a Hugging Face tokenizer (tokenizer.json: a "
            "model or checkpoint folder) or a hub name in the local Hugging Face cache (never downloaded); one "
            "tokenizer for every source; vocabularies over 65,536 ids give uint32 bins"
        },
    )
    threads: int = dataclasses.field(default=0, metadata={"help": "tokenizer threads (0: one per CPU core)"})
    chunk_mb: int = dataclasses.field(default=8, metadata={"help": "MiB of CSV read per batch"})
    log_data: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "also log train.bin, val.bin and meta.json as MLflow artifacts under data/ (runs:/<id>/data)"
        },
    )
    source_root: str = dataclasses.field(
        default="",
        metadata={"help": "folder that relative source paths fall back to (set to the --config file's folder)"},
    )


# ---------------------------------------------------------------------------------------------------- checks
def check(cfg: PrepareConfig) -> None:
    """Reject bad settings before any work, naming the flag."""
    if cfg.split not in SPLITS:
        raise FakegptError(f"--split: expected one of {', '.join(SPLITS)}, got {cfg.split!r}")
    if cfg.format not in FORMATS:
        raise FakegptError(f"--format: expected one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.val_mix not in ("shared", "dose"):
        raise FakegptError(f"--val-mix: expected shared or dose, got {cfg.val_mix!r}")
    if cfg.overlap not in OVERLAP_RULES:
        raise FakegptError(f"--overlap: expected one of {', '.join(OVERLAP_RULES)}, got {cfg.overlap!r}")
    unknown = [t for t in cfg.chat_types if t not in CHAT_TYPES]
    if unknown:
        raise FakegptError(f"--chat-types: unknown chat type {unknown[0]!r} (types: {', '.join(CHAT_TYPES)})")
    parse_columns(cfg.columns)
    cfg.channel_ids = [chat_id(c, "--channel-ids") for c in cfg.channel_ids]  # as meta.json records them
    if cfg.channel_id:
        chat_id(cfg.channel_id, "--channel-id")
    if cfg.split != "date" and not 0.0 <= cfg.val_fraction < 1.0:
        raise FakegptError(f"--val-fraction: must lie in [0, 1), got {cfg.val_fraction}")
    if cfg.split == "date":
        if not cfg.split_date:
            raise FakegptError("--split date needs --split-date YYYY-MM-DD")
        if pl.Series([cfg.split_date]).str.contains(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2})?)?$").item() is False:
            raise FakegptError(f"--split-date: expected YYYY-MM-DD[THH:MM[:SS]], got {cfg.split_date!r}")
    spelling.SpellingNormaliser(cfg.spelling)  # a bad mode, or Enelvo missing, fails here
    if cfg.min_chars < 0:
        raise FakegptError(f"--min-chars: must be >= 0, got {cfg.min_chars}")
    if cfg.max_train_tokens < 0:
        raise FakegptError(f"--max-train-tokens: must be >= 0, got {cfg.max_train_tokens}")
    if cfg.chunk_mb < 1:
        raise FakegptError(f"--chunk-mb: must be >= 1, got {cfg.chunk_mb}")
    if not cfg.out:
        raise FakegptError("--out: an output folder is required")


def source_chat(src: data_sources.Source, cfg: PrepareConfig) -> int | str | None:
    """The chat every message of a source's files is in (its `channel_id`, else --channel-id), or None."""
    if src.channel_id is not None:
        return src.channel_id
    return chat_id(cfg.channel_id, "--channel-id") if cfg.channel_id else None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FakegptError(f"--out {out}: exists and is not a folder")
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not force:
        raise FakegptError(f"--out {out}: already holds {existing[0]}; use --force to overwrite")


# ------------------------------------------------------------------------------------------- reader thread
@dataclasses.dataclass
class _Batch:
    source: int
    texts: pl.Series  # cleaned messages
    val: np.ndarray | None  # per-message val flag (date split), else None
    nbytes: int  # input bytes consumed since the previous batch (progress bar)


class _Ledger:
    """Per message handed on to the tokenizer, in read order: its text hash and epoch time (for dedupe and the
    sequential split), its chat and forward origin as small codes (for the counts of what reached the bins)."""

    def __init__(self) -> None:
        self.hashes: list[np.ndarray] = []
        self.times: list[np.ndarray] = []
        self.chats: list[np.ndarray] = []
        self.fwds: list[np.ndarray] = []
        self.chat_codes: dict[tuple[int, str], int] = {}  # (file number, channel_id) -> code
        self.fwd_codes: dict[str, int] = {}  # forward origin -> code

    def add(self, df: pl.DataFrame, file_no: int, hashes: bool) -> None:
        """Record a cleaned batch (`text`, `date`, `channel_id` as String, `forwarded_from` where known)."""
        if hashes:
            self.hashes.append(df["text"].hash(seed=0).to_numpy())
        self.times.append(dedupe.epoch_seconds(df["date"]))
        chats = df["channel_id"]
        codes = {c: self.chat_codes.setdefault((file_no, c), len(self.chat_codes)) for c in chats.unique()}
        self.chats.append(chats.replace_strict(codes, return_dtype=pl.Int32).to_numpy())
        if "forwarded_from" in df.columns:
            # A forward is a message the export marks with a non-empty origin, as the chat records count them.
            fwd = df.select(pl.when(pl.col("forwarded_from") != "").then(pl.col("forwarded_from")))["forwarded_from"]
            codes = {f: self.fwd_codes.setdefault(f, len(self.fwd_codes)) for f in fwd.drop_nulls().unique()}
            self.fwds.append(fwd.replace_strict(codes, default=-1, return_dtype=pl.Int32).fill_null(-1).to_numpy())
        else:
            self.fwds.append(np.full(df.height, -1, dtype=np.int32))

    @staticmethod
    def _joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def hash_array(self) -> np.ndarray:
        return self._joined(self.hashes, np.uint64)

    def time_array(self) -> np.ndarray:
        return self._joined(self.times, np.int64)

    def reorder(self, order: np.ndarray) -> None:
        """Put every record in `order` (positions in read order), as the scratch file was."""
        for name in ("hashes", "times", "chats", "fwds"):
            parts = getattr(self, name)
            if parts:
                setattr(self, name, [np.concatenate(parts)[order]])

    def counts(self, in_bins: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, Counter[str]]]:
        """Per chat code: messages in the bins, forwards among them, and their forward origins."""
        chats, fwds = self._joined(self.chats, np.int32), self._joined(self.fwds, np.int32)
        n = len(self.chat_codes)
        kept = np.bincount(chats[in_bins], minlength=n)
        is_fwd = in_bins & (fwds >= 0)
        forwards = np.bincount(chats[is_fwd], minlength=n)
        names = {v: k for k, v in self.fwd_codes.items()}
        origins: dict[int, Counter[str]] = {}
        pairs, times = np.unique(np.stack([chats[is_fwd], fwds[is_fwd]]), axis=1, return_counts=True)
        for (c, f), k in zip(pairs.T.tolist(), times.tolist(), strict=True):
            origins.setdefault(c, Counter())[names[f]] = k
        return kept, forwards, origins


class _Reader:
    """Reads, cleans and filters every source in order, putting _Batch items on a bounded queue; what each
    message is goes into its source's _Ledger (duplicates are found once all is read, dedupe.find)."""

    def __init__(
        self,
        cfg: PrepareConfig,
        sources: list[data_sources.Source],
        q: queue.Queue,
        stop: threading.Event,
        drop_texts: tuple[str, ...] = (),
    ):
        self.cfg, self.sources, self.q, self.stop = cfg, sources, q, stop
        self.rules = CleanRules(
            cfg.remove_mentions,
            cfg.remove_urls,
            cfg.remove_symbols,
            cfg.collapse_whitespace,
            cfg.keep_newlines,
            drop_texts=drop_texts,
        )
        self.dropped: Counter[str] = Counter()
        self.files: list[dict[str, Any]] = []  # one entry per file read, per source
        self.spelling = spelling.SpellingNormaliser(cfg.spelling)
        self.columns = parse_columns(cfg.columns)
        self.chat_types = frozenset(cfg.chat_types) or None
        self.ledgers = [_Ledger() for _ in sources]  # per source, what each message handed on is
        # per source, filled in once the bins are known (_count_in_bins)
        self.by_channel: list[Counter[str]] = []
        self.forwards: list[int] = []
        self._source = 0

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            for si, src in enumerate(self.sources):
                self._source = si
                for path in src.files:
                    self._read_file(si, src, path)
                    if self.stop.is_set():
                        return
            self._put(None)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._put(exc)

    def _read_file(self, si: int, src: data_sources.Source, path: str) -> None:
        stats = ReadStats()
        self._file_no = len(self.files)
        raw = None
        if path == data_sources.DEMO:
            raw = io.BytesIO(demo.demo_csv())
        seen_bytes = 0
        batches = readers.read_batches(
            path,
            src.format or self.cfg.format,
            self.cfg.chunk_mb << 20,
            raw=raw,
            stats=stats,
            columns=src.columns if src.columns is not None else self.columns,
            chat_types=self.chat_types,
            chat=source_chat(src, self.cfg),
            fallback_chat=None if raw is not None else readers.file_chat(path),
        )
        for df in batches:
            if self.stop.is_set():
                return
            texts, val = self._process(df, src)
            self._put(_Batch(si, texts, val, stats.bytes_read - seen_bytes))
            seen_bytes = stats.bytes_read
        self.dropped.update(stats.skipped)
        if stats.chat is not None and not self.cfg.channel_id and src.channel_id is None:
            log.info(
                "%s: no chat column; its messages are chat %r (its file name; --channel-id names another)",
                path,
                stats.chat,
            )
        self.files.append({"source": src.name, "path": path, **dataclasses.asdict(stats)})

    def _process(self, df: pl.DataFrame, src: data_sources.Source) -> tuple[pl.Series, np.ndarray | None]:
        cfg = self.cfg
        n = df.height
        df = df.filter(pl.col("message").str.contains(r"\S"))  # nothing but whitespace, before any cleaning
        self.dropped["empty_text"] += n - df.height
        if df["channel_id"].dtype != pl.String:  # (String columns come normalised from the readers)
            df = df.with_columns(bare_channel_expr().cast(pl.String))  # -100-marked ids -> the bare id
        if src.channel_ids:
            n = df.height
            chat = pl.col("channel_id")
            if any(isinstance(c, str) for c in src.channel_ids):  # usernames: case-insensitive, `@` optional
                chat = chat.str.strip_chars_start("@").str.to_lowercase()
            df = df.filter(chat.is_in(chat_keys(src.channel_ids)))
            self.dropped["channel_filter"] += n - df.height
        cols = [clean_expr("message", self.rules).alias("text"), pl.col("date"), pl.col("channel_id")]
        if "forwarded_from" in df.columns:  # Telegram JSON: the display name a forward came from
            cols.append(pl.col("forwarded_from"))
        if cfg.split == "date":
            n = df.height
            df = df.filter(pl.col("date").str.contains(r"^\s*\d{4}-\d{2}-\d{2}"))
            self.dropped["bad_date"] += n - df.height
            cols.append((pl.col("date").str.strip_chars() >= cfg.split_date).alias("val"))
        df = df.select(cols)
        if self.spelling.mode != "none":
            df = df.with_columns(text=self.spelling.normalise(df["text"]))
        n = df.height
        df = df.filter(pl.col("text").str.len_chars() >= max(cfg.min_chars, 1))
        self.dropped["too_short"] += n - df.height
        self.ledgers[self._source].add(df, self._file_no, cfg.dedupe)
        return df["text"], df["val"].to_numpy().astype(bool) if cfg.split == "date" else None


# ------------------------------------------------------------------------------------------ tokenizer side
@dataclasses.dataclass(frozen=True)
class _Tokenizer:
    """The tokenizer of a run: its identity (meta.json), the bins' dtype, and for a Hugging Face tokenizer its
    encoder and the special-token texts cleaning removes (None and () on the bundled GPT-2 path)."""

    identity: hf_tokenizer.TokenizerIdentity
    encoder: hf_tokenizer.MessageEncoder | None = None
    drop_texts: tuple[str, ...] = ()

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.identity.dtype)

    @classmethod
    def resolve(cls, spec: str) -> _Tokenizer:
        identity, backend = hf_tokenizer.resolve(spec, "--tokenizer")
        if backend is None:
            return cls(identity)
        encoder = hf_tokenizer.MessageEncoder(backend, identity.eos_token)
        return cls(identity, encoder, tuple(hf_tokenizer.special_texts(backend)))


class _Sink:
    """Per-source scratch token file plus per-message token lengths and val flags."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.file = open(path, "wb")  # noqa: SIM115 (closed in finish)
        self.lengths: list[np.ndarray] = []
        self.val: list[np.ndarray] = []

    def write(
        self, tokens: np.ndarray, n_messages: int, val: np.ndarray | None, lengths: np.ndarray | None = None
    ) -> None:
        """Append a batch's tokens; `lengths`: each message's token count (EOS included), else found from EOT."""
        if lengths is None:
            ends = np.flatnonzero(tokens == tokenizer.EOT_TOKEN)
            if len(ends) != n_messages:  # cleaning guarantees one EOT per message; anything else is a bug
                raise RuntimeError(f"expected {n_messages} end-of-text tokens, found {len(ends)}")
            lengths = np.diff(ends, prepend=-1)
        elif len(lengths) != n_messages or int(lengths.sum()) != len(tokens):
            raise RuntimeError(f"expected {n_messages} messages of {len(tokens)} tokens, got {len(lengths)}")
        self.lengths.append(lengths.astype(np.uint32))
        self.val.append(val if val is not None else np.zeros(n_messages, dtype=bool))
        tokens.astype(self.dtype).tofile(self.file)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.uint32)
        val = np.concatenate(self.val) if self.val else np.zeros(0, bool)
        return lengths.astype(np.int64), val


def _tokenize_all(
    cfg: PrepareConfig,
    sources: list[data_sources.Source],
    scratch: Path,
    reader: _Reader,
    tok: _Tokenizer,
) -> tuple[list[_Sink], int]:
    """Run the reader thread and tokenize its batches on a thread pool; returns the sinks and bytes read."""
    threads = cfg.threads or os.cpu_count() or 1
    sinks = [_Sink(scratch / f"source{i}.tokens", tok.dtype) for i in range(len(sources))]
    total = sum(os.path.getsize(f) for s in sources for f in s.files if f != data_sources.DEMO) or None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not sys.stderr.isatty())
    if tok.encoder is None:
        tokenizer.get_encoding()  # build it once, before threads race to
    encoder = word_encoder.PieceEncoder()  # each distinct word is encoded once, until the cache is full
    thread = threading.Thread(target=reader.run, name="fakegpt-prepare-reader", daemon=True)
    thread.start()
    pending: list[tuple[_Batch, list[Future]]] = []
    nbytes = 0
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="fakegpt-tokenize") as pool:
            while True:
                item = reader.q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    step = max(1, min(_CHUNK_MESSAGES, -(-len(item.texts) // threads)))
                    parts = [item.texts.slice(i, step) for i in range(0, len(item.texts), step)]
                    if tok.encoder is not None:
                        pending.append((item, [pool.submit(tok.encoder.encode, p) for p in parts]))
                    else:
                        if encoder.words > _MAX_CACHED_WORDS:  # memory stays flat on any vocabulary; in-flight
                            encoder = word_encoder.PieceEncoder()  # parts finish with the old one
                        pending.append((item, [pool.submit(encoder.encode, p) for p in parts]))
                # Keep one batch in flight while the next is read and cleaned.
                while pending and (item is None or len(pending) > 1):
                    batch, futures = pending.pop(0)
                    results = [f.result() for f in futures]
                    if results and tok.encoder is not None:  # (tokens, lengths) per part
                        tokens, lengths = (np.concatenate(x) for x in zip(*results, strict=True))
                        sinks[batch.source].write(tokens, len(batch.texts), batch.val, lengths)
                    elif results:
                        sinks[batch.source].write(np.concatenate(results), len(batch.texts), batch.val)
                    bar.update(batch.nbytes)
                    nbytes += batch.nbytes
                if item is None:
                    break
    finally:
        reader.stop.set()
        thread.join()
        bar.close()
    return sinks, nbytes


# -------------------------------------------------------------------------------------------- assembling
def _sequential_val(n: int, fraction: float) -> np.ndarray:
    val = np.zeros(n, dtype=bool)
    n_val = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    if n_val:
        val[n - n_val :] = True
    return val


def output_files(sources: list[data_sources.Source]) -> tuple[str, ...]:
    """The files a run writes into --out: the bins, a validation file per source of a mixture, meta.json last."""
    per_source = tuple(bins.source_val_file(s.name) for s in sources) if len(sources) > 1 else ()
    return OUTPUT_FILES[:2] + per_source + OUTPUT_FILES[2:]


def _copy_selected(
    src_path: Path,
    lengths: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    out_train: Any,
    out_val: Any,
    dtype: np.dtype = np.dtype(DTYPE),
) -> None:
    """Append the selected messages of one scratch file to the open train and val files, block by block."""
    with open(src_path, "rb") as f:
        start = 0
        while start < len(lengths):
            csum = np.cumsum(lengths[start:])
            stop = start + max(1, int(np.searchsorted(csum, _ASSEMBLE_TOKENS)))
            block_len = lengths[start:stop]
            tokens = np.fromfile(f, dtype=dtype, count=int(block_len.sum()))
            for sel, out in ((train[start:stop], out_train), (val[start:stop], out_val)):
                if out is None:
                    continue
                if sel.all():
                    tokens.tofile(out)
                elif sel.any():
                    tokens[np.repeat(sel, block_len)].tofile(out)
            start = stop


def _split_in_place(
    scratch: Path, lengths: np.ndarray, train: np.ndarray, val: np.ndarray, out: Path, dtype: np.dtype = np.dtype(DTYPE)
) -> None:
    """One source, no mixture: val.bin is copied out of the scratch file, and the scratch file itself, its train
    messages moved to its front (nothing moves when val is its tail and nothing was dropped) and truncated,
    becomes train.bin, so the bulk of the tokens is copied at most once."""
    with atomic_path(out / "val.bin") as v_path, open(v_path, "wb") as fv:
        if _is_tail(val) and train[: len(train) - int(val.sum())].all():
            with open(scratch, "rb") as src:
                src.seek(int(lengths[~val].sum()) * dtype.itemsize)
                shutil.copyfileobj(src, fv, 1 << 24)
        else:
            _copy_selected(scratch, lengths, np.zeros(len(lengths), dtype=bool), val, None, fv, dtype)
    os.truncate(scratch, _compact(scratch, lengths, train, dtype) * dtype.itemsize)
    os.replace(scratch, out / "train.bin")  # same folder tree, so an atomic rename


def _compact(path: Path, lengths: np.ndarray, keep: np.ndarray, dtype: np.dtype) -> int:
    """Move the kept messages of a token file to its front, in order, block by block; returns their tokens.
    Writing never passes the block being read (kept tokens are at most the tokens read)."""
    if keep.all():
        return int(lengths.sum())
    start = int(np.argmin(keep))  # everything before the first message left out stays where it is
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    write = int(offsets[start])
    with open(path, "r+b") as f:
        while start < len(lengths):
            csum = np.cumsum(lengths[start:])
            stop = start + max(1, int(np.searchsorted(csum, _ASSEMBLE_TOKENS)))
            f.seek(int(offsets[start]) * dtype.itemsize)
            tokens = np.fromfile(f, dtype=dtype, count=int(offsets[stop] - offsets[start]))
            kept = tokens[np.repeat(keep[start:stop], lengths[start:stop])]
            f.seek(write * dtype.itemsize)
            kept.tofile(f)
            write += len(kept)
            start = stop
    return write


def _dataset_name(cfg: PrepareConfig) -> str:
    return cfg.name or Path(cfg.out).resolve().name


def prepare(cfg: PrepareConfig, track: bool = True) -> DatasetMeta:
    """Prepare token bins from `cfg`; returns what meta.json holds. With `track`, logs an MLflow run."""
    check(cfg)
    out = Path(cfg.out)
    _check_out(out, cfg.force)
    tok = _Tokenizer.resolve(cfg.tokenizer)  # a bad --tokenizer fails before any input is read
    sources = data_sources.build_sources(cfg.inputs, cfg.sources, cfg.mix, cfg.channel_ids)
    if cfg.max_train_tokens and sources[0].fraction is None:
        raise FakegptError("--max-train-tokens: applies to mixtures (--mix, or a dataset YAML with fractions)")
    columns = parse_columns(cfg.columns)
    for s in sources:
        s.files = data_sources.resolve_files(s, cfg.source_root)
        for f in s.files:
            if f != data_sources.DEMO:
                readers.check(
                    f, s.format or cfg.format, s.columns if s.columns is not None else columns, source_chat(s, cfg)
                )
    if not track:
        return _prepare_into(cfg, sources, out, tok)
    name = _dataset_name(cfg)
    with tracking.run(stage="prepare", run_name=None, tags={tracking.TAG_DATASET: name}, nested=True):
        tracking.log_params(config.to_dict(cfg))
        meta = _prepare_into(cfg, sources, out, tok)
        metrics = {
            tracking.M_DATA_TRAIN_TOKENS: meta.train_tokens,
            tracking.M_DATA_VAL_TOKENS: meta.val_tokens,
            tracking.M_DATA_TRAIN_MESSAGES: meta.train_messages,
            tracking.M_DATA_VAL_MESSAGES: meta.val_messages,
            tracking.M_DATA_REPAIRED_ROWS: meta.read["repaired_rows"],
            tracking.M_DATA_INVALID_UTF8: meta.read["invalid_utf8"],
            tracking.M_DATA_BAD_ROWS: meta.read["bad_rows"],
            tracking.M_PREPARE_TOKENS_PER_S: meta.timing["tokens_per_s"],
            tracking.M_DATA_SECONDS: meta.timing["seconds"],
        }
        metrics.update({tracking.M_DATA_DROPPED_PREFIX + k: v for k, v in meta.dropped.items()})
        metrics.update({tracking.M_DATA_MIX_PREFIX + k: v for k, v in meta.mixture.items()})
        pairs = meta.overlap.get("pairs", {})
        metrics.update({tracking.overlap_metric(*k.split(">", 1)): v for k, v in pairs.items()})
        tracking.log_metrics(metrics)
        if meta.mixture:
            tracking.set_tags({tracking.TAG_MIX: meta.mixture_tag(digits=3)})
        tracking.log_artifact(out / META_FILE)
        tracking.log_dataset_input(meta.dataset, str(out.resolve()), bins.fingerprint(out), context="prepared")
        if cfg.log_data:  # later steps of a pipeline read the bins from the run, wherever it ran
            for name in output_files(sources):
                tracking.log_artifact(out / name, artifact_path="data")
    return meta


def _cpu_seconds() -> float:
    t = os.times()  # all threads of this process
    return t.user + t.system


def _prepare_into(cfg: PrepareConfig, sources: list[data_sources.Source], out: Path, tok: _Tokenizer) -> DatasetMeta:
    """Claim `out` (one run at a time), build the dataset in a work folder and move it in only when complete
    (files.output_dir): a failure leaves an old dataset whole, and a new folder is removed again."""
    with output_dir(out, output_files(sources)) as work:
        _check_out(out, cfg.force)  # again, now that no other run can write here
        meta = _prepare(cfg, sources, work, tok)
    _report(out, meta)
    return meta


def _prepare(cfg: PrepareConfig, sources: list[data_sources.Source], out: Path, tok: _Tokenizer) -> DatasetMeta:
    t0, c0 = time.perf_counter(), _cpu_seconds()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".prepare-", suffix=".tmp", dir=out))
    try:
        reader = _Reader(cfg, sources, queue.Queue(maxsize=3), threading.Event(), tok.drop_texts)
        sinks, nbytes = _tokenize_all(cfg, sources, scratch, reader, tok)
        t_tok = time.perf_counter() - t0
        parts = [sink.finish() for sink in sinks]
        lengths, flags = [p[0] for p in parts], [p[1] for p in parts]
        # The bins hold each source's messages in time order (ties: read order), so a newest-first file gives
        # the very bins of the same messages oldest first; a file read in time order is not rewritten.
        for si, (sink, ledger) in enumerate(zip(sinks, reader.ledgers, strict=True)):
            order = _time_order(ledger.time_array())
            if order is not None:
                _reorder(sink.path, lengths[si], order, tok.dtype)
                lengths[si], flags[si] = lengths[si][order], flags[si][order]
                ledger.reorder(order)
        times = [ledger.time_array() for ledger in reader.ledgers]
        drop: list[np.ndarray] = [np.zeros(len(x), bool) for x in lengths]
        pairs: dict[str, int] = {}
        if cfg.dedupe:
            hashes = [ledger.hash_array() for ledger in reader.ledgers]
            drop, repeats, pairs = dedupe.find(hashes, times, [s.name for s in sources], cfg.overlap)
            reader.dropped["duplicate"] += repeats
        if pairs:
            reader.dropped["cross_source"] += sum(pairs.values())
            log.info(
                "%d messages found in more than one source were kept only where they appear %s (--overlap %s): %s",
                sum(pairs.values()),
                "first in time" if cfg.overlap == "first-in-time" else "in the source read first",
                cfg.overlap,
                ", ".join(f"{k} {v}" for k, v in pairs.items()),
            )
        rng = np.random.default_rng(cfg.seed)  # (random split) drawn in time order, source by source
        val = [_split_flags(f, d, cfg, t, rng) for f, d, t in zip(flags, drop, times, strict=True)]
        train = [~v & ~d for v, d in zip(val, drop, strict=True)]
        n_msgs = sum(len(x) - int(d.sum()) for x, d in zip(lengths, drop, strict=True))
        if n_msgs == 0:
            files = ", ".join(f for s in sources for f in s.files)
            raise FakegptError(f"{files}: no usable messages ({_unusable_text(reader)})")
        fractions = [s.fraction for s in sources]
        _check_sources_used(sources, lengths, train, drop, reader.dropped)
        if fractions[0] is not None:
            train = data_sources.select(
                lengths,
                train,
                fractions,
                cfg.seed,  # type: ignore[arg-type]
                cap=cfg.max_train_tokens,
            )
            if cfg.val_mix == "dose" and any(v.any() for v in val):
                val = data_sources.select(lengths, val, fractions, cfg.seed + 1)  # type: ignore[arg-type]
            unused = sum(int((~(t | v | d)).sum()) for t, v, d in zip(train, val, drop, strict=True))
            reader.dropped["mixture_unused"] += unused
        if (out / META_FILE).exists():  # --force: never leave an old meta.json beside new bins
            (out / META_FILE).unlink()
        if len(sinks) == 1 and fractions[0] is None:
            _split_in_place(sinks[0].path, lengths[0], train[0], val[0], out, tok.dtype)
        else:
            with atomic_path(out / "train.bin") as t_path, atomic_path(out / "val.bin") as v_path:
                with open(t_path, "wb") as ft, open(v_path, "wb") as fv:
                    for sink, length, tr, va in zip(sinks, lengths, train, val, strict=True):
                        _copy_selected(sink.path, length, tr, va, ft, fv, tok.dtype)
            if len(sources) > 1:  # one validation file per source: val/loss/<source> in finetune
                for source, sink, length, va in zip(sources, sinks, lengths, val, strict=True):
                    with atomic_path(out / bins.source_val_file(source.name)) as s_path, open(s_path, "wb") as fs:
                        _copy_selected(sink.path, length, np.zeros(len(length), dtype=bool), va, None, fs, tok.dtype)
        seconds = time.perf_counter() - t0
        _count_in_bins(reader, [t | v for t, v in zip(train, val, strict=True)])
        meta = _meta(cfg, sources, reader, lengths, train, val, nbytes, seconds, t_tok, tok.identity)
        if len(sources) > 1 and cfg.dedupe:
            meta.overlap = {"rule": cfg.overlap, "dropped": sum(pairs.values()), "pairs": pairs}
        meta.timing["cpu_seconds"] = round(_cpu_seconds() - c0, 3)
        meta.write(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return meta


def _check_sources_used(
    sources: list[data_sources.Source],
    lengths: list[np.ndarray],
    train: list[np.ndarray],
    drop: list[np.ndarray],
    dropped: Counter[str],
) -> None:
    """Every source of several must bring train messages: an empty one (a channel_ids typo) would silently
    give a mixture of 0 tokens, or a dataset without that source."""
    if len(sources) < 2:
        return
    for s, length, tr, d in zip(sources, lengths, train, drop, strict=True):
        usable = int((~d).sum())
        if not usable or (s.fraction and not int(length[tr].sum())):
            what = "no usable messages" if not usable else "no train messages (all fell in val)"
            channels = f" with channel_ids {s.channel_ids}" if s.channel_ids else ""
            raise FakegptError(
                f"source {s.name!r} ({', '.join(s.patterns)}{channels}): {what}; check its path and channel_ids "
                f"(dropped over all sources: {_drop_text(dropped)})"
            )


def _split_flags(
    val: np.ndarray, drop: np.ndarray, cfg: PrepareConfig, times: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Per message, True for val: the reader's flags (date), a seeded draw (random), or (sequential) the latest
    in time of the messages not dropped, whatever order the file lists them in; ties in time go by read order."""
    if cfg.split == "random":
        return (rng.random(len(drop)) < cfg.val_fraction) & ~drop
    if cfg.split != "sequential":
        return val & ~drop
    out = np.zeros(len(drop), dtype=bool)
    kept = np.flatnonzero(~drop)
    by_time = kept[np.argsort(times[kept], kind="stable")]
    out[by_time[_sequential_val(len(kept), cfg.val_fraction)]] = True
    return out


def _time_order(times: np.ndarray) -> np.ndarray | None:
    """Read positions in time order (ties: read order); None when the messages were read in time order."""
    if len(times) < 2 or bool((times[1:] >= times[:-1]).all()):
        return None
    return np.argsort(times, kind="stable")


def _reorder(path: Path, lengths: np.ndarray, order: np.ndarray, dtype: np.dtype) -> None:
    """Put the messages of a scratch token file in `order`. Where the messages that move hold few tokens (a
    file almost in time order) they are moved in place; otherwise the file is written again, block by block."""
    n = len(order)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    new_lengths = lengths[order]
    # Stretches that `order` maps onto themselves: a stretch ends where the highest position taken so far is its
    # own. Messages outside stretches of several keep their place, so only those stretches are touched.
    ends = np.flatnonzero(np.maximum.accumulate(order) == np.arange(n))
    starts = np.concatenate([[0], ends[:-1] + 1])
    wide = ends > starts
    moving = np.zeros(n, dtype=bool)
    if wide.any():
        cover = np.zeros(n + 1, dtype=np.int64)
        np.add.at(cover, starts[wide], 1)
        np.add.at(cover, ends[wide] + 1, -1)
        moving = np.cumsum(cover[:n]) > 0
    sel = np.flatnonzero(moving)
    if int(new_lengths[sel].sum()) <= _ASSEMBLE_TOKENS:
        tokens = np.memmap(path, dtype=dtype, mode="r+")
        try:
            dst = _token_index(np.concatenate([[0], np.cumsum(new_lengths)])[sel], new_lengths[sel])
            tokens[dst] = tokens[_token_index(offsets[order[sel]], new_lengths[sel])]
            tokens.flush()
        finally:
            del tokens
        return
    tokens = np.memmap(path, dtype=dtype, mode="r")
    ordered = path.with_suffix(".ordered")
    try:
        with open(ordered, "wb") as f:
            start = 0
            while start < n:
                csum = np.cumsum(new_lengths[start:])
                stop = start + max(1, int(np.searchsorted(csum, _ASSEMBLE_TOKENS)))
                tokens[_token_index(offsets[order[start:stop]], new_lengths[start:stop])].tofile(f)
                start = stop
    finally:
        del tokens  # the map is closed before the file is replaced
    os.replace(ordered, path)


def _token_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Token positions of messages starting at `starts`, one message after another."""
    firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - firsts, lengths) + np.arange(int(lengths.sum()))


def _is_tail(val: np.ndarray) -> bool:
    """True when the val messages are exactly the last ones read (a chronological file's sequential split)."""
    n = int(val.sum())
    return bool(val[len(val) - n :].all())


def _count_in_bins(reader: _Reader, in_bins: list[np.ndarray]) -> None:
    """Chat records count what reached the bins: `kept` (train or val), `forwards` among them and their
    origins; `not_in_bins`: text messages read that cleaning, dedupe, a filter or the mixture left out."""
    reader.by_channel, reader.forwards = [], []
    for si, (ledger, inb) in enumerate(zip(reader.ledgers, in_bins, strict=True)):
        kept, forwards, origins = ledger.counts(inb)
        by_channel: Counter[str] = Counter()
        for (_, chat), code in ledger.chat_codes.items():
            by_channel[chat] += int(kept[code])
        reader.by_channel.append(by_channel)
        reader.forwards.append(int(forwards.sum()))
        for file_no, f in enumerate(reader.files):
            if f["source"] != reader.sources[si].name:
                continue
            for rec in f["chats"]:
                found = ledger.chat_codes.get((file_no, str(bare_channel_id(rec["id"]))))
                handed_on = int(rec["kept"])
                rec["kept"] = int(kept[found]) if found is not None else 0
                rec["not_in_bins"] = handed_on - rec["kept"]
                rec["forwards"] = int(forwards[found]) if found is not None else 0
                top = origins.get(found, Counter()).most_common(telegram_json.TOP_FORWARD_SOURCES)
                rec["forwarded_from"] = dict(top)


def _unusable_text(reader: _Reader) -> str:
    """Why nothing was left: the rows no reader could use (with the first reason given) and the drops."""
    bad = sum(f["bad_rows"] for f in reader.files)
    examples = [e for f in reader.files for e in f["bad_row_examples"]]
    reason = examples[0].rsplit(": ", 1)[-1] if examples else "unreadable"
    rows = f"{bad:,} rows: {reason} (e.g. {examples[0].rsplit(': ', 1)[0]}); " if bad else ""
    return f"{rows}dropped: {_drop_text(reader.dropped)}"


def _drop_text(dropped: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v) or "none"


def _meta(
    cfg: PrepareConfig,
    sources: list[data_sources.Source],
    reader: _Reader,
    lengths: list[np.ndarray],
    train: list[np.ndarray],
    val: list[np.ndarray],
    nbytes: int,
    seconds: float,
    t_tok: float,
    identity: hf_tokenizer.TokenizerIdentity,
) -> DatasetMeta:
    per_source = []
    for si, (s, length, tr, va) in enumerate(zip(sources, lengths, train, val, strict=True)):
        keys = ("path", "sha256", "bytes_read", "format", "rows", "repaired_rows", "bad_rows", "invalid_utf8")
        files = [
            {k: f[k] for k in keys}
            | ({"skipped": f["skipped"], "chats": f["chats"]} if f["chats"] else {})
            | ({"channel_id": f["chat"]} if f["chat"] is not None else {})
            for f in reader.files
            if f["source"] == s.name
        ]
        per_source.append(
            {
                "name": s.name,
                "paths": s.patterns,
                "channel_ids": s.channel_ids,
                "target_fraction": s.fraction,
                "files": files,
                "train_tokens": int(length[tr].sum()),
                "val_tokens": int(length[va].sum()),
                "train_messages": int(tr.sum()),
                "val_messages": int(va.sum()),
                "forwards": reader.forwards[si],
                # the messages of each chat that reached the bins (train or val)
                "messages_by_channel": dict(sorted(reader.by_channel[si].items(), key=_chat_order)),
            }
        )
    train_tokens = sum(p["train_tokens"] for p in per_source)
    val_tokens = sum(p["val_tokens"] for p in per_source)
    tokenized = int(sum(int(x.sum()) for x in lengths))
    mixed = bool(cfg.sources or cfg.mix)  # a plain run (input files only) has no mixture
    examples = [e for f in reader.files for e in f["bad_row_examples"]][:5]
    return DatasetMeta(
        **{
            "dataset": _dataset_name(cfg),
            "encoding": tokenizer.ENCODING_NAME if identity.is_gpt2 else identity.name,
            "vocab_size": identity.vocab_size,
            "eot_token": identity.eos_token,
            "dtype": identity.dtype,
            "tokenizer": identity.to_dict(),
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "train_messages": sum(p["train_messages"] for p in per_source),
            "val_messages": sum(p["val_messages"] for p in per_source),
            "dropped": {
                k: int(reader.dropped.get(k, 0))
                for k in ("channel_filter", "too_short", "duplicate", "bad_date", "mixture_unused", "cross_source")
                + DROP_REASONS
            }
            | {"bad_row": sum(f["bad_rows"] for f in reader.files)},
            "read": {
                "rows": sum(f["rows"] for f in reader.files),
                "repaired_rows": sum(f["repaired_rows"] for f in reader.files),
                "continuation_lines": sum(f["continuation_lines"] for f in reader.files),
                "invalid_utf8": sum(f["invalid_utf8"] for f in reader.files),
                "bad_rows": sum(f["bad_rows"] for f in reader.files),
                "bad_row_examples": examples,
            },
            "sources": per_source,
            "mixture": data_sources.realised({p["name"]: p["train_tokens"] for p in per_source}) if mixed else {},
            # Within a message per source of the cap; None without a cap; False: the scarcest source ran out first.
            "max_train_tokens_reached": (
                train_tokens >= cfg.max_train_tokens - len(lengths) * _longest(lengths)
                if cfg.max_train_tokens
                else None
            ),
            "mixture_val": data_sources.realised({p["name"]: p["val_tokens"] for p in per_source}) if mixed else {},
            "spelling": {"mode": cfg.spelling, "words_replaced": reader.spelling.replaced},
            "split": {
                "mode": cfg.split,
                "val_fraction": cfg.val_fraction,
                "split_date": cfg.split_date,
                "seed": cfg.seed,
            },
            "timing": {
                "seconds": round(seconds, 3),
                "tokenize_seconds": round(t_tok, 3),
                "tokens_per_s": round(tokenized / seconds, 1) if seconds > 0 else 0.0,
                "input_bytes": nbytes,
            },
            "config": config.to_dict(cfg),
            "fakegpt_version": __version__,
        }
    )


def _chat_order(item: tuple[str, int]) -> tuple[bool, int, str]:
    chat = item[0]
    numeric = chat.lstrip("-").isdigit()
    return (not numeric, int(chat) if numeric else 0, chat)


def _longest(lengths: list[np.ndarray]) -> int:
    return max((int(x.max()) for x in lengths if len(x)), default=0)


def _report(out: Path, meta: DatasetMeta) -> None:
    if meta.max_train_tokens_reached is False:
        log.warning(
            "--max-train-tokens %d not reached: the scarcest source allows %d train tokens at this mixture",
            meta.config["max_train_tokens"],
            meta.train_tokens,
        )
    read = meta.read
    if read["repaired_rows"]:
        log.info("repaired %d naive-export rows (message column not quoted)", read["repaired_rows"])
    if read["bad_rows"]:
        log.warning("skipped %d unparseable rows, e.g. %s", read["bad_rows"], "; ".join(read["bad_row_examples"]))
    if read["invalid_utf8"]:
        log.warning("%d invalid UTF-8 sequences were decoded as U+FFFD", read["invalid_utf8"])
    mix = ", ".join(f"{k}={v:.3f}" for k, v in meta.mixture.items())
    log.info(
        "%s: train %d tokens (%d messages), val %d tokens (%d messages); dropped: %s%s; %.1f s, %.2f M tokens/s",
        out,
        meta.train_tokens,
        meta.train_messages,
        meta.val_tokens,
        meta.val_messages,
        _drop_text(Counter(meta.dropped)),
        f"; mixture {mix}" if mix else "",
        meta.timing["seconds"],
        meta.timing["tokens_per_s"] / 1e6,
    )


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_args(argv: list[str]) -> PrepareConfig:
    """Flags (and `--config FILE.yaml`) -> PrepareConfig; a dataset YAML names the dataset and anchors its paths."""
    cfg = config.parse(
        PrepareConfig,
        argv,
        prog="fakegpt prepare",
        description="Telegram CSV exports -> cleaned token bins (train.bin, val.bin, meta.json)",
    )
    path = _config_path(argv)
    if path:
        if not cfg.source_root:
            cfg.source_root = str(Path(path).resolve().parent)
        if not cfg.name:
            cfg.name = Path(path).stem
    return cfg


def main(argv: list[str]) -> int:
    """`fakegpt prepare [INPUT ...] [flags]`; returns the exit status."""
    prepare(parse_args(argv))
    return 0
