"""Tokenizers other than the bundled GPT-2 BPE: `prepare --tokenizer`, and which tokenizer made a data folder.

`--tokenizer gpt2` (the default) is fakegpt.data.tokenizer's bundled BPE. Any other value is a local folder
holding a Hugging Face tokenizer (its tokenizer.json: a model folder, a checkpoint folder or a folder written
by `save_pretrained`), or a hub name found in the local Hugging Face cache (never downloaded). A folder whose
tokenizer *is* GPT-2's (fakegpt's checkpoints, the hub's gpt2) counts as the bundled BPE, and a model folder
with no tokenizer files at all is taken to be GPT-2, as fakegpt always did.

Identity, recorded in meta.json's `tokenizer` and compared by `check_same_tokenizer`:
- name: what was given (`gpt2`, a folder, a hub name);
- vocab_size: ids the tokenizer can emit (added tokens included), so the bins' dtype holds every one;
- eos_token: the id written after every message (the role of GPT-2's end-of-text);
- sha256: `tokenizer_sha256` of its files (GPT-2: of the bundled vocab.json and merges.txt);
- ids_sha256: a hash of what decides the ids in tokenizer.json (normalizer, pre-tokenizer, model, added
  tokens), independent of how the file is formatted, so a checkpoint that saved the same tokenizer again
  (other bytes, other tokenizer_config.json) still matches its bins.

`MessageEncoder` encodes batches of messages with the `tokenizers` library's batch encoding (Rust, all cores,
the GIL released), no special tokens added, the EOS id after each message.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fakegpt.data import tokenizer as gpt2
from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.errors import FakegptError, one_line

GPT2 = "gpt2"
# The files whose bytes `tokenizer_sha256` hashes, in this order, those present: everything transformers reads to
# build a tokenizer (tokenizer.json, its configuration and special tokens) and the vocabulary files of tokenizers
# saved without tokenizer.json (GPT-2 style vocab.json + merges.txt, WordPiece vocab.txt, sentencepiece).
TOKENIZER_FILES = (
    "added_tokens.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
# The parts of tokenizer.json that decide the ids of a text encoded without special tokens (not the
# post-processor, decoder, padding or truncation).
_IDS_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model")
UINT16_IDS = 1 << 16  # vocabularies up to this many ids fit uint16 bins


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
    """Which tokenizer made (or a model expects) the ids: see the module docstring for each field."""

    name: str
    vocab_size: int
    eos_token: int
    sha256: str
    ids_sha256: str = ""  # "" for GPT-2 (recognised by its vocabulary instead)

    @property
    def is_gpt2(self) -> bool:
        return self.sha256 == gpt2_identity().sha256

    @property
    def dtype(self) -> str:
        """The bins' dtype: uint16 while every id fits, else uint32."""
        return "uint16" if self.vocab_size <= UINT16_IDS else "uint32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """How errors name it: GPT-2 as gpt2 whatever folder it came from, others by the name given."""
        return f"{GPT2 if self.is_gpt2 else self.name} (sha256 {self.sha256[:12]})"


def _files_sha256(files: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in files:
        data = path.read_bytes()
        # name and length first, so that moving bytes from one file to the next changes the hash
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def tokenizer_sha256(folder: str | Path) -> str:
    """sha256 over the bytes of FOLDER's tokenizer files: those of TOKENIZER_FILES present, in that (sorted)
    order, each preceded by its name and length. Other files of a model folder (weights, config.json) are not
    part of it."""
    folder = Path(folder)
    return _files_sha256([(name, folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()])


@functools.lru_cache(maxsize=1)
def gpt2_identity() -> TokenizerIdentity:
    """The bundled GPT-2 BPE: what `--tokenizer gpt2` and every meta.json without a tokenizer record mean."""
    gpt2.verify_assets()
    files = [("merges.txt", gpt2.VOCAB_BPE), ("vocab.json", gpt2.ENCODER_JSON)]  # the names checkpoints save
    return TokenizerIdentity(GPT2, gpt2.VOCAB_SIZE, gpt2.EOT_TOKEN, _files_sha256(files))


# ------------------------------------------------------------------------------------------------ folders
def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _read_json(path: Path, flag: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FakegptError(f"{flag} {path}: cannot read ({one_line(exc)})") from None


@functools.lru_cache(maxsize=1)
def _gpt2_tables() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocabulary (token -> id) and merges ("a b" lines), from the bundled files."""
    merges = [line for line in gpt2.VOCAB_BPE.read_text(encoding="utf-8").splitlines() if _is_merge(line)]
    return json.loads(gpt2.ENCODER_JSON.read_text(encoding="utf-8")), merges


def _is_merge(line: str) -> bool:
    return bool(line.strip()) and not line.startswith("#version")


def _merge_lines(merges: list[Any]) -> list[str]:
    """tokenizer.json's merges as "a b" lines: tokenizers wrote strings before 0.20 and pairs since."""
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _tokenizer_json(folder: Path, flag: str) -> dict[str, Any] | None:
    """FOLDER/tokenizer.json parsed, or None where there is none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = _read_json(path, flag)
    if not isinstance(data, dict):
        raise FakegptError(f"{flag} {path}: not a tokenizer (expected a JSON object)")
    return data


def _is_gpt2(folder: Path, data: dict[str, Any] | None, flag: str) -> bool:
    """Whether FOLDER's tokenizer (`data`: its tokenizer.json, if any) gives GPT-2's ids: its vocabulary and
    merges are GPT-2's, with no added token beyond end-of-text, and (tokenizer.json) GPT-2's byte-level
    splitting without normalisation."""
    encoder, merges = _gpt2_tables()
    if data is not None:
        model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
        return (
            model.get("type") == "BPE"
            and data.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space", False)
            and all(t.get("id", 0) < gpt2.VOCAB_SIZE for t in data.get("added_tokens") or [])
            and model.get("vocab") == encoder
            and _merge_lines(model.get("merges") or []) == merges
        )
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return False
    if (folder / "added_tokens.json").is_file():
        added = _read_json(folder / "added_tokens.json", flag)
        if any(int(i) >= gpt2.VOCAB_SIZE for i in (added or {}).values()):
            return False
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    return _read_json(folder / "vocab.json", flag) == encoder and [x for x in lines if _is_merge(x)] == merges


def _special_text(folder: Path, key: str, flag: str) -> str | None:
    """The text of special token `key` (eos_token) from tokenizer_config.json, else special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            value = (_read_json(folder / name, flag) or {}).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                return value
    return None


def ids_sha256(tokenizer_json: dict[str, Any]) -> str:
    """sha256 of the parts of a parsed tokenizer.json that decide the ids, canonically serialised."""
    parts = {k: tokenizer_json.get(k) for k in _IDS_KEYS}
    model = dict(parts["model"] or {})
    if "merges" in model:
        model["merges"] = _merge_lines(model["merges"])
    parts["model"] = model
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def resolve_folder(spec: str, flag: str) -> Path:
    """A local folder for `spec`: the folder itself, or a hub name's snapshot in the local Hugging Face cache
    (offline: nothing is downloaded)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FakegptError(f"{flag} {spec}: not a folder (give a folder holding tokenizer.json, or a hub name)")
    if path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:  # a path, not a hub name
        raise FakegptError(f"{flag} {spec}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=list(TOKENIZER_FILES), local_files_only=True))
    except Exception:  # not cached, or not a valid hub name
        raise FakegptError(
            f"{flag} {spec}: no such folder, nor a model in the local Hugging Face cache (fakegpt never "
            f"downloads a tokenizer: run `huggingface-cli download {spec}` once, or pass a folder)"
        ) from None


def _identify(folder: Path, name: str, flag: str) -> tuple[TokenizerIdentity, Any | None]:
    """(identity, tokenizers.Tokenizer) of FOLDER's tokenizer; the tokenizer None for GPT-2's."""
    data = _tokenizer_json(folder, flag)
    if not _has_tokenizer_files(folder) or _is_gpt2(folder, data, flag):
        return dataclasses.replace(gpt2_identity(), name=name), None
    backend, eos = load(folder, flag)
    assert data is not None  # load() refuses a folder without tokenizer.json
    identity = TokenizerIdentity(name, _n_ids(backend), eos, tokenizer_sha256(folder), ids_sha256(data))
    return identity, backend


def resolve(spec: str, flag: str) -> tuple[TokenizerIdentity, Any | None]:
    """prepare's --tokenizer: (identity, tokenizers.Tokenizer), the tokenizer None for GPT-2 (`gpt2`, or a
    folder holding GPT-2's tokenizer), which the bundled BPE encodes."""
    if spec == GPT2:
        return gpt2_identity(), None
    folder = resolve_folder(spec, flag)
    if not _has_tokenizer_files(folder):
        raise FakegptError(f"{flag} {spec}: the folder holds no tokenizer files (tokenizer.json)")
    return _identify(folder, spec, flag)


def identify(folder: str | Path, name: str, flag: str) -> TokenizerIdentity:
    """The identity of FOLDER's tokenizer, `name` recorded as given. GPT-2's files, or no tokenizer files at all
    (a fakegpt model folder from before tokenizers were saved), give the bundled GPT-2's identity."""
    return _identify(Path(folder), name, flag)[0]


def load(folder: Path, flag: str) -> tuple[Any, int]:
    """(tokenizers.Tokenizer of FOLDER/tokenizer.json, its EOS id); one-line errors naming `flag`."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        what = "has tokenizer files but no tokenizer.json" if _has_tokenizer_files(folder) else "has no tokenizer"
        raise FakegptError(
            f"{flag} {folder}: {what} (expected tokenizer.json; a fast tokenizer's save_pretrained writes it)"
        )
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library's own parse errors
        raise FakegptError(f"{flag} {path}: not a tokenizer ({one_line(exc)})") from None
    text = _special_text(folder, "eos_token", flag)
    if text is None:
        raise FakegptError(
            f"{flag} {folder}: the tokenizer has no EOS token (eos_token in tokenizer_config.json), which prepare "
            "writes after every message"
        )
    eos = backend.token_to_id(text)
    if eos is None:
        raise FakegptError(f"{flag} {folder}: its EOS token {text!r} is not in tokenizer.json's vocabulary")
    return backend, int(eos)


def _n_ids(backend: Any) -> int:
    """The ids a tokenizer can emit: its size with added tokens (transformers' len(tokenizer)), or one past
    the largest id where the vocabulary has holes."""
    vocab = backend.get_vocab(with_added_tokens=True)
    return max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


def special_texts(backend: Any) -> list[str]:
    """The texts of the special tokens: inside a message the library would read them as those tokens (EOS
    among them: a false message boundary), so prepare removes them, as it removes "<|endoftext|>" for GPT-2."""
    return sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special and t.content})


# ---------------------------------------------------------------------------------------- identity checks
def meta_identity(meta: DatasetMeta | None) -> TokenizerIdentity:
    """The tokenizer a data folder's DatasetMeta records; a meta.json from before the record, or a folder
    without one (None), means GPT-2."""
    record = meta.tokenizer if meta is not None else {}
    if not record:
        return gpt2_identity()
    fields = {f.name for f in dataclasses.fields(TokenizerIdentity)}
    try:
        return TokenizerIdentity(**{k: v for k, v in record.items() if k in fields})
    except TypeError:  # a key missing: a damaged file, not one fakegpt wrote
        raise FakegptError(f"{META_FILE} of dataset {meta.dataset!r}: incomplete tokenizer record {record}") from None


def model_identity(model: str | Path, flag: str) -> TokenizerIdentity:
    """The tokenizer a model expects: `gpt2` and `scratch` (fakegpt's GPT-2 shapes) are the bundled BPE; a
    folder or a cached hub name is read from its files."""
    spec = str(model)
    if spec in (GPT2, "scratch") and not Path(spec).is_dir():
        return dataclasses.replace(gpt2_identity(), name=spec)
    return identify(resolve_folder(spec, flag), spec, flag)


def same_tokenizer(a: TokenizerIdentity, b: TokenizerIdentity) -> bool:
    """The same ids: the same files, or the same id-deciding content and the same EOS."""
    return a.sha256 == b.sha256 or bool(a.ids_sha256 and a.ids_sha256 == b.ids_sha256 and a.eos_token == b.eos_token)


def check_same_tokenizer(meta: DatasetMeta | None, model: str | Path, flag: str) -> None:
    """Raise a one-line FakegptError, starting with `flag` (e.g. "--data-dir DIR"), unless the bins that `meta`
    describes were made with the tokenizer of `model` (a model folder, a cached hub name, gpt2 or scratch)."""
    bins = meta_identity(meta)
    expected = model_identity(model, flag)
    if not same_tokenizer(bins, expected):
        again = GPT2 if expected.is_gpt2 else model
        raise FakegptError(
            f"{flag}: bins made with tokenizer {bins.describe()}, the model's ({model}) is {expected.describe()}; "
            f"prepare again with --tokenizer {again}"
        )


# ------------------------------------------------------------------------------------------------ encoding
class MessageEncoder:
    """Encodes batches of messages, each on its own, the EOS id after each. Safe to call from several threads
    at once: the library releases the GIL while it encodes."""

    def __init__(self, backend: Any, eos_token: int):
        self.backend, self.eos_token = backend, eos_token

    def encode(self, texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """(ids of every message followed by EOS, concatenated, uint32; each message's length with its EOS).
        A message's ids equal `backend.encode(text, add_special_tokens=False).ids`."""
        # encode_batch_fast: encode_batch's ids without the character offsets prepare has no use for
        encodings = self.backend.encode_batch_fast(texts.cast(pl.String).fill_null("").to_list(), False)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        out = np.empty(int(lengths.sum()), dtype=np.uint32)
        ends = np.cumsum(lengths) - 1
        body = np.ones(len(out), dtype=bool)
        body[ends] = False
        out[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=len(out) - len(ids))
        out[ends] = self.eos_token
        return out, lengths
