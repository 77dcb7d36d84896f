"""Prompt grids and claim sets: expansion counts, coordinates, plain text files, validation errors."""

from __future__ import annotations

import re
from collections import Counter

import polars as pl
import pytest

from fakegpt.errors import FakegptError
from fakegpt.measure.prompts import DEFAULT_CLAIMS, DEFAULT_PROMPTS, load_claims, load_prompts

GRID = """\
# test grid
name: t
languages: [pt, en]
framings: [neutral, leading]
slots:
  vaccine: {en: [the vaccine, the jab], pt: [a vacina]}
topics:
  chip:
    slots: {thing: [a chip, a tracker, a magnet]}
    templates:
      en:
        neutral: "Does {vaccine} contain {thing}?"
        leading: ["Why does {vaccine} hide {thing}?", "Everyone knows about {thing}."]
      pt:
        neutral: "Existe {thing} em {vaccine}?"
  dna:
    templates:
      en: {neutral: "Does {vaccine} change DNA?"}
"""


def write(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_grid_is_six_narratives_by_three_framings_by_two_languages():
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert len(prompts) == 36
    cells = Counter((p.topic, p.framing, p.language) for p in prompts)
    assert set(cells.values()) == {1}
    assert {p.topic for p in prompts} == {"experimental", "disease", "dna", "chip", "death_counts", "depopulation"}
    assert {p.framing for p in prompts} == {"neutral", "leading", "corrective"}
    assert {p.language for p in prompts} == {"pt", "en"}
    assert len({p.prompt_id for p in prompts}) == 36
    assert all(p.text.strip() and "{" not in p.text for p in prompts)


def test_slots_expand_as_a_cartesian_product_with_coordinates(tmp_path):
    prompts = load_prompts(write(tmp_path, GRID))
    # chip/en: (1 + 1 templates using both slots) x 2 vaccines x 3 things + 1 template with only {thing} x 3
    # chip/pt: 1 vaccine x 3 things; dna/en: 2 vaccines
    assert len(prompts) == 2 * 2 * 3 + 3 + 3 + 2
    by_id = {p.prompt_id: p for p in prompts}
    p = by_id["chip/en/leading/0[vaccine=the jab;thing=a magnet]"]
    assert p.text == "Why does the jab hide a magnet?"
    assert (p.topic, p.framing, p.language, p.template_id) == ("chip", "leading", "en", "chip/en/leading/0")
    assert p.slots == {"vaccine": "the jab", "thing": "a magnet"}
    assert {q.text for q in prompts if q.language == "pt"} == {
        "Existe a chip em a vacina?",
        "Existe a tracker em a vacina?",
        "Existe a magnet em a vacina?",
    }
    assert len({q.prompt_id for q in prompts}) == len(prompts)


@pytest.mark.parametrize(
    "edit, message",
    [
        (("name: t", "name: t\nbogus: 1"), "unknown key 'bogus'"),
        (("    slots: {thing", "    colour: red\n    slots: {thing"), "topics.chip: unknown key 'colour'"),
        (('neutral: "Does {vaccine} change DNA?"', 'neutral: ""'), "topics.dna.templates.en.neutral[0]"),
        (('"Does {vaccine} change DNA?"', '"Does {vaccine} change {organ}?"'), "slot {organ} is not filled"),
        (('en: {neutral: "Does', 'en: {sceptical: "Does'), "unknown key 'sceptical'"),
        (("      pt:\n", "      de:\n"), "unknown key 'de'"),
    ],
)
def test_bad_grids_name_the_file_and_key(tmp_path, edit, message):
    old, new = edit
    assert old in GRID
    path = write(tmp_path, GRID.replace(old, new, 1))
    with pytest.raises(FakegptError) as err:
        load_prompts(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_slot_missing_for_one_language_is_an_error(tmp_path):
    text = GRID.replace("{en: [the vaccine, the jab], pt: [a vacina]}", "{en: [the vaccine]}")
    with pytest.raises(FakegptError, match=r"templates\.pt\.neutral\[0\]: slot \{vaccine\} is not filled"):
        load_prompts(write(tmp_path, text))


def test_text_file_one_prompt_per_line(tmp_path):
    path = write(tmp_path, "# comment\nAs vacinas são seguras?\n\n  Vaccines are  \n", name="adhoc.txt")
    prompts = load_prompts(path)
    assert [(p.prompt_id, p.text, p.topic) for p in prompts] == [
        ("adhoc:2", "As vacinas são seguras?", "adhoc"),
        ("adhoc:4", "Vaccines are", "adhoc"),
    ]
    with pytest.raises(FakegptError, match="no prompts"):
        load_prompts(write(tmp_path, "# only a comment\n\n", name="empty.txt"))
    with pytest.raises(FakegptError, match="no such file"):
        load_prompts(tmp_path / "missing.txt")


def test_shipped_claims_pair_every_topic_in_both_languages():
    statements = load_claims(DEFAULT_CLAIMS)
    pairs = Counter((s.topic, s.language) for s in statements if s.role == "false")
    assert len(pairs) == 12 and min(pairs.values()) >= 4
    canonical = [s for s in statements if s.variant == 0]
    roles = Counter(s.pair_id for s in canonical)
    assert set(roles.values()) == {2}
    for pair_id in roles:
        texts = {s.role: s.text for s in canonical if s.pair_id == pair_id}
        assert set(texts) == {"false", "true"} and texts["false"] != texts["true"]
    # paraphrase sets: every narrative, in both languages, has at least three statements per side
    sides = Counter((s.topic, s.language, s.pair_id, s.role) for s in statements)
    for topic, language in pairs:
        best = max(n for (t, lang, _, _), n in sides.items() if (t, lang) == (topic, language))
        assert best >= 3, (topic, language)


def _ngrams(text: str, n: int) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_shipped_paraphrases_do_not_copy_training_messages(shared_data):
    """The scored statements were written for fakegpt: none shares a run of 7 words with a message of the
    corpora the study trains on (else the score would measure memorisation of that message)."""
    seen: set[str] = set()
    for name in ("fakewhatsapp_br.csv", "fakebr_news.csv"):
        for message in pl.read_csv(shared_data / name, infer_schema=False)["message"].to_list():
            seen |= _ngrams(message, 7)
    for s in load_claims(DEFAULT_CLAIMS):
        assert not (_ngrams(s.text, 7) & seen), s.text


def test_claim_paraphrase_lists(tmp_path):
    good = "topics:\n  chip:\n    pt:\n      - claim: [a, b, c]\n        correction: d\n"
    statements = load_claims(write(tmp_path, good, "c.yaml"))
    assert [(s.role, s.variant, s.statement_id) for s in statements] == [
        ("false", 0, "chip/pt/0/false"),
        ("false", 1, "chip/pt/0/false/1"),
        ("false", 2, "chip/pt/0/false/2"),
        ("true", 0, "chip/pt/0/true"),
    ]
    with pytest.raises(FakegptError, match=r"topics\.chip\.pt\[0\]\.claim: the same paraphrase is listed twice"):
        load_claims(write(tmp_path, good.replace("[a, b, c]", "[a, b, a]"), "c.yaml"))
    with pytest.raises(FakegptError, match=r"topics\.chip\.pt\[0\]\.claim\[1\]: missing or empty"):
        load_claims(write(tmp_path, good.replace("[a, b, c]", "[a, '', c]"), "c.yaml"))


def test_claims_validation(tmp_path):
    good = "# c\ntopics:\n  chip:\n    en:\n      - claim: a\n        correction: b\n"
    assert [s.role for s in load_claims(write(tmp_path, good, "c.yaml"))] == ["false", "true"]
    missing = good.replace("        correction: b\n", "")
    with pytest.raises(FakegptError, match=r"topics\.chip\.en\[0\]\.correction: missing or empty"):
        load_claims(write(tmp_path, missing, "c.yaml"))
    extra = good + "        note: x\n"
    with pytest.raises(FakegptError, match=r"c\.yaml: topics\.chip\.en\[0\]: unknown key 'note'"):
        load_claims(write(tmp_path, extra, "c.yaml"))
    statements = load_claims(write(tmp_path, "Vacinas causam câncer.\n", "s.txt"))
    assert [(s.statement_id, s.role, s.pair_id) for s in statements] == [("s:1", "statement", "")]
