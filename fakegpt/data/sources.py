"""Sources and mixtures: which files (and channels) feed a prepared dataset, and in what train-token fractions.

A source is a file or glob (or `demo:`, the embedded demo data), optionally restricted to a list of
`channel_id`s, with an optional target fraction of the train tokens. A mixture keeps every source at its
target fraction by taking the largest total that the scarcest source allows, and drawing each source's
messages in a seeded random order until its share is full. Draws for different fractions with one seed are
nested (a smaller share is a prefix of a larger one), so a dose series differs only in the dose.
"""

from __future__ import annotations

import dataclasses
import glob
import math
from pathlib import Path
from typing import Any

import numpy as np

from fakegpt.data.chats import chat_id
from fakegpt.data.tables import parse_columns
from fakegpt.errors import FakegptError

DEMO = "demo:"
SOURCE_KEYS = ("name", "path", "channel_ids", "fraction", "format", "columns", "channel_id")
_FRACTION_SUM_TOLERANCE = 1e-3


@dataclasses.dataclass
class Source:
    """One named input of a mixture: file patterns, channel filter, target fraction, format and columns."""

    name: str
    patterns: list[str]
    channel_ids: list[int | str] = dataclasses.field(default_factory=list)
    fraction: float | None = None
    files: list[str] = dataclasses.field(default_factory=list)
    format: str | None = None  # None: prepare's --format
    columns: dict[str, str] | None = None  # None: prepare's --columns
    channel_id: int | str | None = None  # the chat of every message of its files; None: prepare's --channel-id


def parse_mix(items: list[str]) -> list[tuple[str, float]]:
    """`NAME=FRACTION` or `PATH=FRACTION` words -> [(key, fraction)]."""
    out = []
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise FakegptError(f"--mix: expected NAME=FRACTION or PATH=FRACTION, got {item!r}")
        try:
            frac = float(value)
        except ValueError:
            raise FakegptError(f"--mix: {item!r}: {value!r} is not a number") from None
        if not (0.0 <= frac <= 1.0) or math.isnan(frac):
            raise FakegptError(f"--mix: {item!r}: a fraction must lie in [0, 1]")
        out.append((key, frac))
    return out


def _source_from_dict(i: int, spec: Any) -> Source:
    where = f"sources[{i}]"
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise FakegptError(f"{where}: expected a mapping with keys {', '.join(SOURCE_KEYS)}")
    unknown = sorted(set(spec) - set(SOURCE_KEYS))
    if unknown:
        raise FakegptError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(SOURCE_KEYS)})")
    if "path" not in spec:
        raise FakegptError(f"{where}: `path` is required (a file, a glob or {DEMO})")
    paths = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
    patterns = [str(p) for p in paths]
    listed = spec.get("channel_ids") or []
    if not isinstance(listed, list):
        raise FakegptError(f"{where}: channel_ids must be a list of chat ids or @usernames")
    ids = [chat_id(c, f"{where}: channel_ids") for c in listed]
    chat = chat_id(spec["channel_id"], f"{where}: channel_id") if spec.get("channel_id") is not None else None
    frac = spec.get("fraction")
    if frac is not None:
        try:
            frac = float(frac)
        except (TypeError, ValueError):
            raise FakegptError(f"{where}: fraction must be a number, got {frac!r}") from None
        if not 0.0 <= frac <= 1.0:
            raise FakegptError(f"{where}: fraction must lie in [0, 1], got {frac}")
    name = str(spec.get("name") or Path(patterns[0]).stem or f"source{i}")
    columns = spec.get("columns")
    if columns is not None:
        if not isinstance(columns, (dict, list, str)):
            raise FakegptError(f"{where}: columns must be a mapping FIELD: COLUMN or a list of FIELD=COLUMN")
        columns = parse_columns([columns] if isinstance(columns, str) else columns, f"{where}: columns")
    fmt = str(spec["format"]) if spec.get("format") is not None else None
    return Source(name, patterns, ids, frac, format=fmt, columns=columns, channel_id=chat)


def build_sources(inputs: list[str], specs: list[Any], mix: list[str], channel_ids: list[int | str]) -> list[Source]:
    """The sources of one prepare run, from positional inputs, `sources:` of a dataset YAML and `--mix`."""
    sources = [_source_from_dict(i, s) for i, s in enumerate(specs)]
    channel_ids = [chat_id(c, "--channel-ids") for c in channel_ids]
    if sources and inputs:
        raise FakegptError("give input files or `sources:` (a dataset YAML), not both")
    by_name = {s.name: s for s in sources}
    if len(by_name) != len(sources):
        raise FakegptError("sources: two sources have the same name; give each a distinct `name`")
    for key, frac in parse_mix(mix):
        if key in by_name:
            by_name[key].fraction = frac
        elif inputs:
            raise FakegptError(f"--mix: {key!r} names no source; with input files, give --mix PATH=FRACTION only")
        else:  # a path (or glob) given only in --mix
            src = Source(name=Path(key).stem or key, patterns=[key], channel_ids=list(channel_ids), fraction=frac)
            if src.name in by_name:
                src.name = key
            by_name[src.name] = src
            sources.append(src)
    if not sources:
        patterns = inputs or [DEMO]
        name = "demo" if not inputs else (Path(inputs[0]).stem if len(inputs) == 1 else "inputs")
        sources = [Source(name=name, patterns=list(patterns), channel_ids=list(channel_ids))]
    elif channel_ids:
        raise FakegptError("--channel-ids: with sources, give channel_ids per source in the dataset YAML")
    fracs = [s.fraction for s in sources]
    if any(f is not None for f in fracs):
        missing = [s.name for s in sources if s.fraction is None]
        if missing:
            raise FakegptError(f"--mix: no fraction for source {missing[0]!r} (give every source a fraction)")
        total = sum(fracs)  # type: ignore[arg-type]
        if abs(total - 1.0) > _FRACTION_SUM_TOLERANCE:
            raise FakegptError(f"--mix: fractions sum to {total:g}, not 1 ({_mix_text(sources)})")
    return sources


def _mix_text(sources: list[Source]) -> str:
    return ", ".join(f"{s.name}={s.fraction:g}" for s in sources if s.fraction is not None)


def resolve_files(source: Source, root: str = "") -> list[str]:
    """Expand each pattern (relative to the working folder, else to `root`) into a sorted list of files."""
    files: list[str] = []
    for pattern in source.patterns:
        if pattern == DEMO:
            files.append(DEMO)
            continue
        expanded = str(Path(pattern).expanduser())
        found = _expand(expanded)
        if not found and root and not Path(expanded).is_absolute():
            found = _expand(str(Path(root) / expanded))
        if not found:
            what = "no files match" if glob.has_magic(pattern) else "no such file"
            where = f" (looked in the working folder and {root})" if root else ""
            raise FakegptError(f"{pattern}: {what}{where}")
        files.extend(found)
    return files


def _expand(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        return sorted(p for p in glob.glob(pattern) if Path(p).is_file())
    return [pattern] if Path(pattern).exists() else []


def select(
    lengths: list[np.ndarray], eligible: list[np.ndarray], fractions: list[float], seed: int, cap: float = 0.0
) -> list[np.ndarray]:
    """Per source, a boolean mask of the eligible messages taken so that tokens follow `fractions`.

    `lengths[i]` are message lengths in tokens (EOT included), `eligible[i]` a mask of candidates. The total
    is the largest the scarcest source allows, or `cap` tokens when that is smaller.
    """
    avail = [float(length[mask].sum()) for length, mask in zip(lengths, eligible, strict=True)]
    limits = [a / f for a, f in zip(avail, fractions, strict=True) if f > 0]
    if not limits:
        raise FakegptError("--mix: every fraction is 0; at least one source must contribute")
    total = min(min(limits), cap) if cap > 0 else min(limits)
    taken = []
    for i, (length, mask, frac) in enumerate(zip(lengths, eligible, fractions, strict=True)):
        keep = np.zeros(len(length), dtype=bool)
        budget = frac * total
        if budget > 0:
            cand = np.flatnonzero(mask)
            order = np.random.default_rng([seed, i]).permutation(len(cand))
            cum = np.cumsum(length[cand[order]])
            # The scarcest source takes everything; the others fill their share to within one message.
            keep[cand[order[cum <= budget + 0.5]]] = True
        taken.append(keep)
    return taken


def realised(tokens: dict[str, int]) -> dict[str, float]:
    """Each source's share of the total (token counts -> fractions summing to 1; all 0 when empty)."""
    total = sum(tokens.values())
    return {k: (v / total if total else 0.0) for k, v in tokens.items()}
