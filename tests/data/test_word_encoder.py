"""The distinct-word encoder gives exactly tiktoken's ids: on the real corpora, on every Unicode code point, on
random text built to hit the pattern's corners, and in the bins `prepare` writes."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pytest

from fakegpt.data import word_encoder
from fakegpt.data.prepare import PrepareConfig, prepare
from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding


def tiktoken_ids(texts: list[str]) -> np.ndarray:
    """tiktoken alone, one message at a time, each followed by EOT."""
    enc = get_encoding()
    return np.array([t for text in texts for t in [*enc.encode_ordinary(text), EOT_TOKEN]], dtype=np.uint32)


def real_messages(shared_data) -> list[str]:
    """All WhatsApp messages and the first 500 news articles (the rest adds time, not cases)."""
    whatsapp = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)["message"]
    news = pl.read_csv(shared_data / "fakebr_news.csv", infer_schema=False)["message"].head(500)
    return pl.concat([whatsapp, news]).fill_null("").to_list()


def test_real_corpora_raw_and_cleaned(shared_data):
    from fakegpt.data.clean import clean_series

    raw = real_messages(shared_data)
    cleaned = clean_series(pl.Series(raw)).to_list()
    for texts, slow_share in ((raw, (0.05, 0.8)), (cleaned, (0.0, 0.01))):
        series = pl.Series(texts)
        share = series.str.contains(word_encoder.NEEDS_TIKTOKEN).mean()
        # Raw exports mix both paths (double spaces, blank lines); cleaned text all but takes the word path.
        assert slow_share[0] <= share <= slow_share[1], share
        np.testing.assert_array_equal(word_encoder.encode_messages(series), tiktoken_ids(texts))


def test_every_code_point():
    """The word path on its own (no routing), one message per code point: the character inside a word, after
    a space and at the end. Within a word tiktoken itself splits; only polars' notion of whitespace (the
    routing) could disagree with tiktoken's, and here it does not, for any character."""
    messages = pl.Series([f"x{c}x {c}" for c in map(chr, range(0x110000)) if not 0xD800 <= ord(c) < 0xE000])
    # whitespace c: beside a space
    messages = messages.filter(~messages.str.contains(word_encoder.NEEDS_TIKTOKEN))
    assert len(messages) > 1_100_000
    np.testing.assert_array_equal(
        word_encoder.PieceEncoder().encode_words(messages), word_encoder.encode_joined(messages)
    )


def test_random_text_at_the_pattern_corners():
    rng = random.Random(0)
    alphabet = [
        *"ab sdtmlvreXYZ0129'.,!?-\n\t\r",
        "  ",
        " \n",
        "\u00a0",
        "ção",
        "é",
        "ñ",
        "\u2028",
        "\u0301",
        "😀",
        "中文",
        "ß",
        "Ω",
        "٣",
        "’s",
        "'ll",
        "'S",
        "\u3000",
        "\u200b",
        "\x85",
        "\u2003",
        "''",
    ]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(20000)]
    series = pl.Series(texts)
    routed = series.str.contains(word_encoder.NEEDS_TIKTOKEN)
    assert 0.5 < routed.mean() < 0.95  # both paths and their interleaving are exercised
    np.testing.assert_array_equal(word_encoder.encode_messages(series), tiktoken_ids(texts))
    fast = series.filter(~routed)
    np.testing.assert_array_equal(word_encoder.PieceEncoder().encode_words(fast), tiktoken_ids(fast.to_list()))


@pytest.mark.parametrize("texts", [[], [""], ["", ""], ["", "a", ""], ["  ", ""], [None, "a b"]])
def test_edge_cases(texts):
    got = word_encoder.encode_messages(pl.Series(texts, dtype=pl.String))
    np.testing.assert_array_equal(got, tiktoken_ids([t or "" for t in texts]))


def test_end_of_text_inside_a_message_is_refused():
    with pytest.raises(ValueError, match="endoftext"):
        word_encoder.encode_messages(pl.Series(["fine", "not <|endoftext|> fine"]))


@pytest.mark.parametrize("collapse", [True, False])
def test_prepare_bins_hold_tiktoken_ids(tmp_path, shared_data, collapse):
    """Decoding the bins and re-encoding each message with tiktoken gives the bins back, id for id. Without
    whitespace collapsing many messages keep runs of blanks and go to tiktoken, interleaved with the rest."""
    out = tmp_path / "out"
    prepare(
        PrepareConfig(inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(out), collapse_whitespace=collapse),
        track=False,
    )
    enc = get_encoding()
    for name in ("train.bin", "val.bin"):
        tokens = np.fromfile(out / name, dtype=np.uint16)
        ends = np.flatnonzero(tokens == EOT_TOKEN)
        texts = [enc.decode(m[:-1].tolist()) for m in np.split(tokens, ends + 1)[:-1]]
        assert len(texts) > 100
        np.testing.assert_array_equal(tokens, tiktoken_ids(texts))
        if not collapse:
            assert pl.Series(texts).str.contains(r"\s\s").sum() > 10


def test_one_encoder_shared_by_threads_remembers_words(shared_data):
    """prepare's use: one encoder for the run, batches encoded on a thread pool; every batch still equals
    tiktoken, and words learnt from one batch serve the next."""
    from concurrent.futures import ThreadPoolExecutor

    from fakegpt.data.clean import clean_series

    texts = clean_series(pl.Series(real_messages(shared_data)))
    parts = [texts.slice(i, 300) for i in range(0, len(texts), 300)]
    encoder = word_encoder.PieceEncoder()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(encoder.encode, parts * 2))  # the second round finds every piece known
    for part, ids in zip(parts * 2, got, strict=True):
        np.testing.assert_array_equal(ids, tiktoken_ids(part.to_list()))
    assert encoder._n_ids < sum(len(ids) for ids in got) / 8  # each distinct word stored once


def test_a_full_word_cache_starts_afresh_with_identical_bins(tmp_path, shared_data, monkeypatch):
    """prepare replaces its encoder once it has learnt _MAX_CACHED_WORDS words, so memory stays flat on any
    vocabulary; the bins do not change."""
    import fakegpt.data.prepare as prep

    created = []
    real = word_encoder.PieceEncoder

    def counting() -> word_encoder.PieceEncoder:
        created.append(1)
        return real()

    data = str(shared_data / "fakewhatsapp_br.csv")
    prepare(PrepareConfig(inputs=[data], out=str(tmp_path / "a"), chunk_mb=1), track=False)
    monkeypatch.setattr(prep, "_MAX_CACHED_WORDS", 500)
    monkeypatch.setattr(prep.word_encoder, "PieceEncoder", counting)
    prepare(PrepareConfig(inputs=[data], out=str(tmp_path / "b"), chunk_mb=1), track=False)
    assert len(created) >= 2  # the first encoder and at least one fresh one
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
