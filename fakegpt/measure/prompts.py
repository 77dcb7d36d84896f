"""Prompt grids and claim sets as data: YAML files in experiments/, or plain text with one entry per line.

A prompt grid (experiments/prompts/*.yaml) is topics x languages x framings of templates; a template may hold
`{slot}`s, filled by the Cartesian product of the slot values (given once for the file, per topic, and either
as one list or per language). Each expanded prompt keeps its coordinates: topic, framing, language, template id.

    name: antivax-six
    languages: [pt, en]
    framings: [neutral, leading, corrective]
    slots: {vaccine: {en: [the COVID-19 vaccine], pt: [a vacina da COVID-19]}}
    topics:
      dna:
        templates:
          en: {neutral: "Does {vaccine} change human DNA?", leading: [...], corrective: ...}
          pt: {...}

A claim set (experiments/claims/*.yaml) pairs a false claim with its fact-checked correction:

    name: antivax-six-claims
    topics:
      dna:
        en: [{claim: "...", correction: "..."}, ...]
        pt: [...]

Everything is validated when loaded: an unknown key, an empty template or an unfilled slot is a FakegptError
naming the file and the key path.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakegpt.config import load_yaml
from fakegpt.errors import FakegptError
from fakegpt.files import read_text

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = "experiments/prompts/antivax_six.yaml"
DEFAULT_CLAIMS = "experiments/claims/antivax_six.yaml"
YAML_SUFFIXES = (".yaml", ".yml")

_GRID_KEYS = {"name", "description", "languages", "framings", "slots", "topics"}
_TOPIC_KEYS = {"description", "slots", "templates"}
_CLAIMSET_KEYS = {"name", "description", "topics"}
_PAIR_KEYS = {"claim", "correction", "source"}


@dataclass(frozen=True)
class Prompt:
    """One prompt of a grid: its text and where in the grid it came from (topic, framing, language, template, slots)."""

    prompt_id: str
    text: str
    topic: str = "adhoc"
    framing: str = ""
    language: str = ""
    template_id: str = ""
    slots: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Statement:
    """One statement to score. Paired statements share `pair_id`; `role` is "false", "true" or "statement".

    `claim_id` names the claim across languages: the i-th pair of a topic in every language is one claim
    translated, so intervals resample claims, not pairs (a pair and its translation are not independent).
    `variant` numbers the paraphrases of one side of a pair: variant 0 is the statement the pair score uses;
    every variant takes part in the MC1/MC2 scores.
    """

    statement_id: str
    text: str
    topic: str = "adhoc"
    language: str = ""
    pair_id: str = ""
    role: str = "statement"
    claim_id: str = ""
    variant: int = 0


def resolve_path(spec: str | Path) -> Path:
    """A path as given, or else relative to the project checkout (so the shipped defaults work from anywhere)."""
    path = Path(spec).expanduser()
    if path.exists() or path.is_absolute():
        return path
    beside = REPO_ROOT / path
    return beside if beside.exists() else path


def _check_keys(data: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise FakegptError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise FakegptError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(allowed))})")
    return data


def _str_list(value: Any, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, (str, int, float)) or isinstance(item, bool) or not str(item).strip():
            raise FakegptError(f"{where}[{i}]: expected a non-empty string, got {item!r}")
        out.append(str(item))
    if not out:
        raise FakegptError(f"{where}: empty list")
    return out


def _slot_values(slots: Any, language: str, where: str) -> dict[str, list[str]]:
    """Slot name -> values for `language`; a slot may be one list or a mapping language -> list."""
    if slots is None:
        return {}
    if not isinstance(slots, dict):
        raise FakegptError(f"{where}: expected a mapping of slot names to value lists")
    out = {}
    for name, values in slots.items():
        if isinstance(values, dict):
            if language not in values:
                continue  # this slot has no values in this language: a template using it is reported as unfilled
            values = values[language]
            out[str(name)] = _str_list(values, f"{where}.{name}.{language}")
        else:
            out[str(name)] = _str_list(values, f"{where}.{name}")
    return out


def _template_slots(template: str, where: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise FakegptError(f"{where}: bad template {template!r} ({exc}; write literal braces as {{{{ }}}})") from None
    for name in names:
        if not name.isidentifier():
            raise FakegptError(f"{where}: bad slot {{{name}}} in {template!r} (slot names are identifiers)")
    return list(dict.fromkeys(names))


def _read_lines(path: Path) -> list[tuple[int, str]]:
    text = read_text(path)  # missing, unreadable or not UTF-8: one line naming the file (and line)
    lines = [(n, line.strip()) for n, line in enumerate(text.split("\n"), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise FakegptError(f"{path}: no prompts (one per line; lines starting with # are comments)")
    return lines


def load_prompts(spec: str | Path) -> list[Prompt]:
    """Expand a prompt grid YAML, or read a text file of one prompt per line (ids `<file stem>:<line>`)."""
    path = resolve_path(spec)
    if path.suffix.lower() not in YAML_SUFFIXES:
        return [
            Prompt(prompt_id=f"{path.stem}:{n}", text=line, template_id=f"{path.stem}:{n}")
            for n, line in _read_lines(path)
        ]
    data = _check_keys(load_yaml(path), _GRID_KEYS, str(path))
    languages = _str_list(data.get("languages", ["en"]), f"{path}: languages")
    framings = _str_list(data.get("framings", ["neutral"]), f"{path}: framings")
    topics = data.get("topics")
    if not isinstance(topics, dict) or not topics:
        raise FakegptError(f"{path}: key 'topics' must be a non-empty mapping of topic -> templates")
    prompts: list[Prompt] = []
    for topic, body in topics.items():
        where = f"{path}: topics.{topic}"
        body = _check_keys(body, _TOPIC_KEYS, where)
        templates = _check_keys(body.get("templates"), set(languages), f"{where}.templates")
        for language, by_framing in templates.items():
            by_framing = _check_keys(by_framing, set(framings), f"{where}.templates.{language}")
            slots = _slot_values(data.get("slots"), language, f"{path}: slots")
            slots.update(_slot_values(body.get("slots"), language, f"{where}.slots"))
            for framing, texts in by_framing.items():
                key = f"{where}.templates.{language}.{framing}"
                for i, template in enumerate(_str_list(texts, key)):
                    prompts += _expand(template, slots, f"{key}[{i}]", str(topic), str(framing), str(language), i)
    return prompts


def _expand(
    template: str, slots: dict[str, list[str]], where: str, topic: str, framing: str, language: str, index: int
) -> list[Prompt]:
    names = _template_slots(template, where)
    missing = [n for n in names if n not in slots]
    if missing:
        raise FakegptError(f"{where}: slot {{{missing[0]}}} is not filled (no values under slots for {language!r})")
    template_id = f"{topic}/{language}/{framing}/{index}"
    out = []
    for combo in itertools.product(*(slots[n] for n in names)):
        filled = dict(zip(names, combo, strict=True))
        suffix = "" if not filled else "[" + ";".join(f"{k}={v}" for k, v in filled.items()) + "]"
        out.append(
            Prompt(
                prompt_id=template_id + suffix,
                text=template.format(**filled),
                topic=topic,
                framing=framing,
                language=language,
                template_id=template_id,
                slots=filled,
            )
        )
    return out


def _paraphrases(value: Any, where: str) -> list[str]:
    """One statement, or a list of paraphrases of it (the first is the one the pair score uses)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise FakegptError(f"{where}: missing or empty statement (a string, or a list of paraphrases)")
    out = []
    for j, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise FakegptError(f"{where}[{j}]: missing or empty statement")
        out.append(text.strip())
    if len(set(out)) != len(out):
        raise FakegptError(f"{where}: the same paraphrase is listed twice")
    return out


def load_claims(spec: str | Path) -> list[Statement]:
    """Statements to score: a claim set YAML (pairs -> two statements each) or a text file, one per line."""
    path = resolve_path(spec)
    if path.suffix.lower() not in YAML_SUFFIXES:
        return [Statement(statement_id=f"{path.stem}:{n}", text=line) for n, line in _read_lines(path)]
    data = _check_keys(load_yaml(path), _CLAIMSET_KEYS, str(path))
    topics = data.get("topics")
    if not isinstance(topics, dict) or not topics:
        raise FakegptError(f"{path}: key 'topics' must be a non-empty mapping of topic -> language -> pairs")
    out: list[Statement] = []
    for topic, by_language in topics.items():
        if not isinstance(by_language, dict) or not by_language:
            raise FakegptError(f"{path}: topics.{topic}: expected a mapping of language -> list of pairs")
        for language, pairs in by_language.items():
            where = f"{path}: topics.{topic}.{language}"
            if not isinstance(pairs, list) or not pairs:
                raise FakegptError(f"{where}: expected a non-empty list of {{claim, correction}} pairs")
            for i, pair in enumerate(pairs):
                pair = _check_keys(pair, _PAIR_KEYS, f"{where}[{i}]")
                pair_id = f"{topic}/{language}/{i}"
                for role, key in (("false", "claim"), ("true", "correction")):
                    for variant, text in enumerate(_paraphrases(pair.get(key), f"{where}[{i}].{key}")):
                        out.append(
                            Statement(
                                statement_id=f"{pair_id}/{role}" + (f"/{variant}" if variant else ""),
                                text=text,
                                topic=str(topic),
                                language=str(language),
                                pair_id=pair_id,
                                role=role,
                                claim_id=f"{topic}/{i}",
                                variant=variant,
                            )
                        )
    return out
