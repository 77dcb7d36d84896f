"""Each cleaning rule, on its own and switched off, on text shaped like the real exports."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest

from fakegpt.data.clean import CleanRules, clean_series


def clean(text: str, **rules) -> str:
    return clean_series(pl.Series([text]), CleanRules(**rules)).item()


def test_mentions_removed_or_kept():
    assert clean("Oi @joao_silva, tudo bem?") == "Oi , tudo bem?"
    kept = clean("Oi @joao_silva, tudo bem?", remove_mentions=False, remove_symbols=False)
    assert kept == "Oi @joao_silva, tudo bem?"


@pytest.mark.parametrize(
    "url", ["https://g1.globo.com/a/b?x=1&y=2", "http://t.me/canal/123", "www.uol.com.br/x", "HTTPS://BIT.LY/ABC"]
)
def test_urls_removed(url):
    assert clean(f"Veja {url} agora") == "Veja agora"
    assert url in clean(f"Veja {url} agora", remove_urls=False, remove_symbols=False)


def test_url_with_at_sign_goes_whole():
    assert clean("link https://medium.com/@autor/post fim") == "link fim"


def test_symbols_emoji_go_accents_and_punctuation_stay():
    text = 'Atenção!!! 🚨🚨 1️⃣ Vacinação é "segura", diz a OMS (95%) — ç ã õ ê ü 1º ⚠️ ★ <|endoftext|>'
    assert clean(text) == 'Atenção!!! 1 Vacinação é "segura", diz a OMS (95%) — ç ã õ ê ü 1º endoftext'
    kept = clean(text, remove_symbols=False)
    assert "🚨🚨" in kept and "★" in kept
    assert "<|endoftext|>" not in kept  # would be read back as a message boundary


def test_invisible_and_mojibake_characters_go():
    # U+FEFF and U+0096 occur in the real WhatsApp data; U+2028 is whitespace.
    assert clean("a\ufeffb c\u0096d e\u2028f") == "ab cd e f"
    assert clean("cafe\u0301 com leite") == "cafe\u0301 com leite"  # NFD accent stays on its letter


def test_whitespace_collapse_keeps_one_newline():
    text = "  linha um  \t com espaços \n\n\n  linha dois \r\n linha três  "
    assert clean(text) == "linha um com espaços\nlinha dois\nlinha três"
    assert clean(text, keep_newlines=False) == "linha um com espaços linha dois linha três"
    raw = clean(text, collapse_whitespace=False)
    assert "  \t " in raw and "\n\n\n" in raw


def test_all_rules_off_is_identity_but_strip():
    off = dataclasses.replace(
        CleanRules(), remove_mentions=False, remove_urls=False, remove_symbols=False, collapse_whitespace=False
    )
    text = " @ana 😀 https://x.y  a "
    assert clean_series(pl.Series([text]), off).item() == text.strip()


def test_real_messages(shared_data):
    msgs = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)["message"]
    cleaned = clean_series(msgs)
    assert cleaned.len() == msgs.len()
    assert not cleaned.str.contains(r"https?://|www\.|\p{Extended_Pictographic}|\ufeff").any()
    assert not cleaned.str.contains(r"  |\n\n").any()
    # accents survive: the real text is Portuguese
    assert cleaned.str.contains("ção").sum() > 500


def test_email_addresses_removed_or_kept_whole():
    text = "Escreva para contato.br+sus@example.com.br ou @ouvidoria hoje."
    assert clean(text) == "Escreva para ou hoje."
    assert clean(text, remove_mentions=False) == "Escreva para contato.br+sus@example.com.br ou ouvidoria hoje."
    kept = clean(text, remove_mentions=False, remove_symbols=False)
    assert kept == text
    # an @ that is no address's stays a symbol; a mention keeps its word
    assert clean("50 @ 2 reais e @canal", remove_mentions=False) == "50 2 reais e canal"
