"""Optional spelling normalisation (Enelvo's lexicons): only changed words are touched, case kept; in prepare."""

from __future__ import annotations

import re
import sys

import numpy as np
import polars as pl
import pytest

from fakegpt.cli import main as cli_main
from fakegpt.data import spelling
from fakegpt.data.prepare import PrepareConfig, prepare
from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding

pytest.importorskip("enelvo", reason="the enelvo extra is installed by tools/setup.sh")


def test_slang_and_enelvo_modes_keep_case_punctuation_and_layout():
    texts = pl.Series(["vc eh mto lgl, naum sei pq.", "VC tah aki? Vc vai!\nBlz", "", "123 !!", None])
    slang = spelling.SpellingNormaliser("slang")
    assert slang.normalise(texts).to_list() == [
        "você é muito lgl, não sei porque.",
        "VOCÊ está aqui? Você vai!\nBeleza",
        "",
        "123 !!",
        "",
    ]
    assert slang.replaced == 10  # vc eh mto naum pq VC tah aki Vc Blz
    full = spelling.SpellingNormaliser("enelvo")
    assert full.normalise(texts).to_list()[0] == "você é muito legal, não sei porque."  # lgl: learnt lexicon
    assert spelling.SpellingNormaliser("none").normalise(texts) is texts


def reference(message: str, lexicon: dict[str, str]) -> str:
    """The rule written out with Python's re, one message at a time: every word found in the lexicon (lower
    case) is replaced, upper case kept for whole-word capitals and a capital first letter."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        fix = lexicon.get(word.lower())
        if not fix or fix == word.lower():
            return word
        if len(word) > 1 and word == word.upper():
            return fix.upper()
        return fix[0].upper() + fix[1:] if word[0] == word[0].upper() else fix

    return re.sub(r"[^\W\d_]+", swap, message)


def test_real_messages_match_a_plain_python_rewrite(shared_data):
    raw = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)["message"].fill_null("")
    norm = spelling.SpellingNormaliser("slang")
    out = norm.normalise(raw)
    assert norm.replaced > 500
    assert 100 < (out != raw).sum() < len(raw) // 2
    lexicon = spelling._lexicons().in_lex
    assert out.to_list() == [reference(m, lexicon) for m in raw.to_list()]
    assert not out.str.contains(r"(?i)\bvc\b").any()


def test_prepare_with_spelling(tmp_path, shared_data):
    out = tmp_path / "out"
    meta = prepare(
        PrepareConfig(inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(out), spelling="slang"), track=False
    )
    assert meta.spelling["mode"] == "slang" and meta.spelling["words_replaced"] > 500
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    text = get_encoding().decode(tokens[tokens != EOT_TOKEN].tolist())
    assert " vc " not in text and " você " in text


def test_bad_mode_and_missing_enelvo_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert cli_main(["prepare", "--out", str(tmp_path / "o"), "--spelling", "fancy"]) == 2
    assert "--spelling: expected one of none, slang, enelvo, got 'fancy'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "enelvo", None)  # import fails as if not installed
    spelling._lexicons.cache_clear()
    try:
        assert cli_main(["prepare", "--out", str(tmp_path / "o"), "--spelling", "slang"]) == 2
    finally:
        spelling._lexicons.cache_clear()
    err = capsys.readouterr().err.strip()
    assert err.endswith("--spelling: needs Enelvo, an optional extra: pip install 'fakegpt[enelvo]'")
    assert "\n" not in err and not (tmp_path / "o").exists()
