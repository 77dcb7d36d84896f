"""The hand-off from `prepare` to every stage that reads a data folder: `meta.json`, as one typed contract.

`prepare` writes it with `DatasetMeta.write`; `finetune`, `score`, `tune` and the studies read it with
`DatasetMeta.load`. A folder without one, a damaged one, or one written by a newer fakegpt is a one-line error
naming the file, so no stage trains on bins whose origin it cannot state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fakegpt.contracts import from_versioned_dict, to_versioned_dict
from fakegpt.errors import FakegptError
from fakegpt.files import read_json_object, write_json

META_FILE = "meta.json"
# 1: the layout fakegpt 0.1 wrote (files without the key are version 1). Bump on an incompatible change.
SCHEMA_VERSION = 1


@dataclass
class DatasetMeta:
    """What a prepared data folder holds: token counts, sources and their realised shares, how it was made."""

    SCHEMA: ClassVar[int] = SCHEMA_VERSION
    NUMBERS: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "eot_token",
        "train_tokens",
        "val_tokens",
        "train_messages",
        "val_messages",
    )

    dataset: str  # name (dataset YAML's name or the output folder's)
    encoding: str  # the tokenizer of the ids: "gpt2" (the bundled BPE) or the --tokenizer given
    vocab_size: int  # ids the tokenizer can emit
    eot_token: int  # separates messages in the bins: GPT-2's end-of-text, or the tokenizer's EOS
    dtype: str  # of the bins: "uint16", or "uint32" for a vocabulary of more than 65,536 ids
    train_tokens: int
    val_tokens: int
    train_messages: int
    val_messages: int
    dropped: dict[str, int]  # messages dropped, by reason
    read: dict[str, Any]  # what the readers found: rows, repaired rows, bad rows with examples
    # per source: name, paths, channel_ids, files (with sha256; Telegram JSON: per-chat records), token counts,
    # forwards (messages kept after cleaning and dedupe that the export marks as forwarded) and
    # messages_by_channel (messages kept after cleaning and dedupe, per channel_id)
    sources: list[dict[str, Any]]
    mixture: dict[str, float]  # realised train-token share per source; {} for a plain (unmixed) run
    max_train_tokens_reached: bool | None  # None without a cap; False: the scarcest source ran out first
    mixture_val: dict[str, float]
    spelling: dict[str, Any]
    split: dict[str, Any]
    timing: dict[str, Any]
    config: dict[str, Any]  # prepare's resolved configuration
    fakegpt_version: str
    schema_version: int = SCHEMA_VERSION
    # Mixtures (several sources, dedupe on): the rule for a cleaned text found in several sources
    # ("first-in-time" or "first-read"), how many copies it dropped, and the counts per pair "KEPT>DROPPED_FROM".
    overlap: dict[str, Any] = field(default_factory=dict)
    # The tokenizer's identity (fakegpt.data.hf_tokenizer.TokenizerIdentity): name, vocab_size, eos_token, sha256
    # of its files, ids_sha256. A meta.json written before the record existed holds GPT-2 ids ({} here).
    tokenizer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer minor version added; kept on round trip

    def shares(self) -> dict[str, float]:
        """Realised train-token share per source: the mixture, or for a plain run its sources' shares."""
        if self.mixture:
            return dict(self.mixture)
        total = sum(s["train_tokens"] for s in self.sources)
        return {s["name"]: s["train_tokens"] / total for s in self.sources} if total > 0 else {}

    def mixture_tag(self, digits: int = 2) -> str:
        """The realised shares as "general=0.80,antivax=0.20" (the `fakegpt.mixture` tag)."""
        return ",".join(f"{name}={share:.{digits}f}" for name, share in self.shares().items())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as meta.json (unknown keys of a newer minor version kept)."""
        data = to_versioned_dict(self)
        if not data["tokenizer"]:  # a meta.json from before the record reads and compares as it was written
            del data["tokenizer"]
        return data

    def write(self, folder: str | Path) -> Path:
        """Write FOLDER/meta.json atomically; returns its path."""
        path = Path(folder) / META_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = META_FILE) -> DatasetMeta:
        """Build from a parsed meta.json; `where` names the file in errors."""
        return from_versioned_dict(cls, data, where)

    @classmethod
    def load(cls, folder: str | Path) -> DatasetMeta:
        """FOLDER/meta.json; missing, damaged or from an incompatible version: one-line error naming it."""
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise FakegptError(
                f"{path}: no such file; {folder} is not a complete prepared data folder "
                "(run `fakegpt prepare` again: it writes meta.json last)"
            )
        return cls.from_dict(read_json_object(path), str(path))
