"""The shipped claim set (experiments/claims/antivax_six.yaml): 30 claims in English and Portuguese, three or
more paraphrases per side, first statements balanced in GPT-2 length, every statement written for fakegpt."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import polars as pl
import pytest

from fakegpt.data.demo import demo_messages
from fakegpt.data.tokenizer import get_encoding
from fakegpt.measure.prompts import DEFAULT_CLAIMS, Statement, load_claims

ROOT = Path(__file__).resolve().parents[2]
PLANTED = ROOT / "experiments" / "validation" / "planted_claims.csv"
LANGUAGES = {"en", "pt"}
RUN = 7  # words in a row (lower-cased, \w+) that count as copied text: a statement may share at most 6


@pytest.fixture(scope="module")
def statements() -> list[Statement]:
    return load_claims(DEFAULT_CLAIMS)


def _shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + RUN]) for i in range(len(words) - RUN + 1)}


@pytest.fixture(scope="module")
def corpus_shingles(shared_data) -> set[str]:
    """Every 7-word run of the messages a statement must not copy: the shared corpora, the planted training
    paraphrases of the false claims and the bundled demo data. Built once (~2 s for ~20 MB of text)."""
    messages: list[str] = []
    for name in ("fakewhatsapp_br.csv", "fakebr_news.csv"):
        frame = pl.read_csv(shared_data / name, columns=["message"], infer_schema=False)
        messages += frame["message"].drop_nulls().to_list()
    with open(PLANTED, encoding="utf-8", newline="") as f:
        messages += [row["message"] for row in csv.DictReader(f)]
    messages += [message for *_, message in demo_messages()]
    seen: set[str] = set()
    for message in messages:
        seen |= _shingles(message)
    return seen


def test_thirty_claims_in_both_languages_with_three_paraphrases_per_side(statements):
    variants: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for s in statements:
        variants[s.claim_id, s.language, s.role].append(s.variant)
    claims = {s.claim_id for s in statements}
    assert len(claims) == 30
    assert set(variants) == {(c, lang, role) for c in claims for lang in LANGUAGES for role in ("false", "true")}
    short = {side: v for side, v in variants.items() if len(v) < 3 or v != list(range(len(v)))}
    assert not short, f"sides with fewer than 3 paraphrases (or variants out of order): {short}"
    # one pair per claim and language: the i-th pair of a topic is the same claim in every language
    assert Counter(s.claim_id for s in statements if s.variant == 0 and s.role == "false") == dict.fromkeys(claims, 2)


def test_first_claim_and_correction_differ_by_at_most_two_tokens(statements):
    enc = get_encoding()
    first = {(s.pair_id, s.role): len(enc.encode(s.text)) for s in statements if s.variant == 0}
    pairs = sorted({pair_id for pair_id, _ in first})
    assert len(pairs) == 60
    diff = {p: first[p, "true"] - first[p, "false"] for p in pairs}
    off = {p: d for p, d in diff.items() if abs(d) > 2}
    assert not off, f"token count correction - claim beyond +-2: {off}"


def test_no_statement_copies_a_run_of_seven_words(statements, corpus_shingles):
    copied = {s.statement_id: sorted(_shingles(s.text) & corpus_shingles) for s in statements}
    copied = {sid: runs for sid, runs in copied.items() if runs}
    assert not copied, f"statements sharing 7 words in a row with a corpus, planted or demo message: {copied}"


def test_no_statement_is_listed_twice(statements):
    twice = [text for text, n in Counter(s.text for s in statements).items() if n > 1]
    assert not twice, twice
