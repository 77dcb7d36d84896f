"""The bundled GPT-2 BPE gives exactly tiktoken's "gpt2" ids, built offline, on real Portuguese text."""

from __future__ import annotations

import hashlib
import json
import shutil

import polars as pl
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from fakegpt.data import tokenizer
from fakegpt.errors import FakegptError

GPT2_URLS = {
    tokenizer.VOCAB_BPE: "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    tokenizer.ENCODER_JSON: "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture
def official_gpt2(tmp_path, monkeypatch) -> tiktoken.Encoding:
    """tiktoken's own registry encoding "gpt2", loaded through its own code path from a cache folder that
    holds the bundled files under tiktoken's cache names (sha1 of the URL). Downloading is made to fail, so a
    cache miss cannot reach the network; tiktoken's own hash pins check the files."""
    for path, url in GPT2_URLS.items():
        shutil.copyfile(path, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    local_read = tiktoken.load.read_file

    def no_network(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise AssertionError(f"tiktoken tried to download {blobpath}")
        return local_read(blobpath)  # fakegpt's own bundled files

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    return tiktoken.get_encoding("gpt2")


def _real_texts(shared_data, n: int = 400) -> list[str]:
    wa = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)["message"].head(n).to_list()
    news = pl.read_csv(shared_data / "fakebr_news.csv", infer_schema=False)["message"].head(n // 4).to_list()
    return wa + news


def test_ids_equal_tiktoken_gpt2_on_real_text(official_gpt2, shared_data):
    ours = tokenizer.get_encoding()
    texts = _real_texts(shared_data)
    assert sum(len(t) for t in texts) > 300_000  # emoji, accents, URLs, U+2028, U+FEFF and all
    assert ours.encode_ordinary_batch(texts) == official_gpt2.encode_ordinary_batch(texts)
    joined = "<|endoftext|>".join(texts[:50])
    assert ours.encode(joined, allowed_special="all") == official_gpt2.encode(joined, allowed_special="all")
    assert ours.n_vocab == official_gpt2.n_vocab == tokenizer.VOCAB_SIZE


def test_known_ids_and_eot():
    enc = tokenizer.get_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids, as in every GPT-2 tutorial
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT_TOKEN]
    assert enc.decode(enc.encode_ordinary("Vacinação é segura 💉")) == "Vacinação é segura 💉"


def test_hf_tokenizer_files_match(tmp_path, shared_data):
    from transformers import AutoTokenizer

    tokenizer.write_hf_tokenizer_files(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    enc = tokenizer.get_encoding()
    for text in _real_texts(shared_data, 60):
        assert hf(text)["input_ids"] == enc.encode_ordinary(text)
    assert json.loads((tmp_path / "vocab.json").read_text())["<|endoftext|>"] == tokenizer.EOT_TOKEN


def test_tampered_asset_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(tokenizer.VOCAB_BPE.read_bytes() + b"x")
    monkeypatch.setattr(tokenizer, "VOCAB_BPE", bad)
    with pytest.raises(FakegptError, match="does not match tiktoken's pinned"):
        tokenizer.verify_assets()


def test_fast_ranks_equal_tiktokens_data_gym_loader():
    """The start-up shortcut gives exactly the ranks tiktoken's own loader builds from the two files."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    expected = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(tokenizer.VOCAB_BPE),
        encoder_json_file=str(tokenizer.ENCODER_JSON),
        vocab_bpe_hash=tokenizer.VOCAB_BPE_SHA256,
        encoder_json_hash=tokenizer.ENCODER_JSON_SHA256,
    )
    assert tokenizer._mergeable_ranks() == expected
