"""`prepare --tokenizer`: a Hugging Face tokenizer's ids in uint16 or uint32 bins, its identity in meta.json, the
bins read back with meta.json's dtype, and bins refused by finetune and score for a model of another tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_prepare import expected_messages
from tiny_runs import make_tokenizer

from fakegpt import cli
from fakegpt.data import bins, hf_tokenizer
from fakegpt.data.clean import CleanRules
from fakegpt.data.meta import DatasetMeta
from fakegpt.data.prepare import PrepareConfig, prepare
from fakegpt.errors import FakegptError
from fakegpt.finetune.batches import Batches


def backend(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def own_encoding(folder: Path, messages: list[str], eos: int) -> np.ndarray:
    """The tokenizer's own ids of each message (no special tokens), each followed by EOS."""
    tok = backend(folder)
    ids = [i for m in messages for i in [*tok.encode(m, add_special_tokens=False).ids, eos]]
    return np.asarray(ids, dtype=np.int64)


def whatsapp(shared_data: Path) -> pl.Series:
    return pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)["message"]


@pytest.fixture(scope="module")
def prepared_big(tmp_path_factory, shared_data, big_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("prepared-big")
    cfg = PrepareConfig(inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(out), tokenizer=str(big_tokenizer))
    prepare(cfg, track=False)
    return out


@pytest.fixture(scope="module")
def prepared_small(tmp_path_factory, shared_data, small_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("prepared-small")
    cfg = PrepareConfig(inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(out), tokenizer=str(small_tokenizer))
    prepare(cfg, track=False)
    return out


def test_big_vocabulary_gives_uint32_bins_of_the_tokenizer_s_own_ids(prepared_big, big_tokenizer, shared_data):
    from transformers import AutoTokenizer

    meta = json.loads((prepared_big / "meta.json").read_text())
    eos = backend(big_tokenizer).token_to_id("<|end|>")
    assert meta["dtype"] == "uint32"
    assert (meta["vocab_size"], meta["eot_token"], meta["encoding"]) == (70_000, eos, str(big_tokenizer))
    assert meta["vocab_size"] == len(AutoTokenizer.from_pretrained(big_tokenizer))  # transformers' count agrees
    assert meta["tokenizer"] == {
        "name": str(big_tokenizer),
        "vocab_size": 70_000,
        "eos_token": eos,
        "sha256": hf_tokenizer.tokenizer_sha256(big_tokenizer),
        "ids_sha256": hf_tokenizer.ids_sha256(json.loads((big_tokenizer / "tokenizer.json").read_text())),
    }
    train = np.fromfile(prepared_big / "train.bin", dtype=np.uint32)
    val = np.fromfile(prepared_big / "val.bin", dtype=np.uint32)
    kept = expected_messages(whatsapp(shared_data))
    np.testing.assert_array_equal(np.concatenate([train, val]), own_encoding(big_tokenizer, kept, eos))
    assert train.max() >= 1 << 16  # ids uint16 could not hold occur in the real messages
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["train_messages"] + meta["val_messages"] == len(kept) == int((train == eos).sum() + (val == eos).sum())


def test_uint32_bins_read_back_through_bins_and_batches(prepared_big):
    train = np.fromfile(prepared_big / "train.bin", dtype=np.uint32)
    data = bins.open_bin(prepared_big, "train", 32)
    assert data.dtype == np.uint32 and len(data) == len(train)
    batches = Batches(data, batch_size=4, block_size=32, device=torch.device("cpu"), seed=0)
    starts = np.flatnonzero(train >= 1 << 16)[:4] - 3  # windows holding ids beyond uint16
    x, y = batches.windows(starts)
    assert x.dtype == torch.int64 and int(x.max()) >= 1 << 16
    assert x.tolist() == [train[s : s + 32].tolist() for s in starts]
    assert y.tolist() == [train[s + 1 : s + 33].tolist() for s in starts]
    fp = bins.fingerprint(prepared_big)
    assert fp["train_tokens"] == str(len(train))  # counted in uint32 ids, not bytes / 2


def test_small_vocabulary_gives_uint16_bins(prepared_small, small_tokenizer, shared_data):
    meta = DatasetMeta.load(prepared_small)
    eos = backend(small_tokenizer).token_to_id("<|end|>")
    assert (meta.dtype, meta.vocab_size, meta.eot_token) == ("uint16", 8000, eos)
    tokens = np.concatenate([np.fromfile(prepared_small / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    kept = expected_messages(whatsapp(shared_data))
    np.testing.assert_array_equal(tokens, own_encoding(small_tokenizer, kept, eos))
    assert bins.open_bin(prepared_small, "val", 32).dtype == np.uint16


def test_default_records_the_bundled_gpt2_and_a_gpt2_folder_gives_the_same_bins(
    prepared_whatsapp, tiny_model_dir, shared_data, tmp_path
):
    meta = DatasetMeta.load(prepared_whatsapp)
    gpt2 = hf_tokenizer.gpt2_identity()
    assert meta.tokenizer == {
        "name": "gpt2",
        "vocab_size": 50257,
        "eos_token": 50256,
        "sha256": gpt2.sha256,
        "ids_sha256": "",
    }
    assert (meta.encoding, meta.dtype) == ("gpt2", "uint16")
    # a model folder with fakegpt's GPT-2 tokenizer files is the bundled BPE: the same bytes
    cfg = PrepareConfig(
        inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(tmp_path), tokenizer=str(tiny_model_dir)
    )
    again = prepare(cfg, track=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (prepared_whatsapp / name).read_bytes()
    assert again.tokenizer["sha256"] == gpt2.sha256 and again.tokenizer["name"] == str(tiny_model_dir)


def test_a_mixture_uses_one_tokenizer_for_every_source(tmp_path, shared_data, big_tokenizer):
    yaml = tmp_path / "mix.yaml"
    csv = shared_data / "fakewhatsapp_br.csv"
    yaml.write_text(
        "name: mix\nsources:\n"
        f"  - {{name: general, path: {csv}, channel_ids: [2, 4], fraction: 0.8}}\n"
        f"  - {{name: antivax, path: {csv}, channel_ids: [1, 3], fraction: 0.2}}\n"
    )
    out = tmp_path / "out"
    assert cli.main(["prepare", "--config", str(yaml), "--out", str(out), "--tokenizer", str(big_tokenizer)]) == 0
    meta = DatasetMeta.load(out)
    assert meta.dtype == "uint32" and abs(meta.mixture["antivax"] - 0.2) < 0.005
    train, val = (np.fromfile(out / f"{s}.bin", dtype=np.uint32) for s in ("train", "val"))
    assert meta.train_tokens == len(train) and train[-1] == meta.eot_token
    per_source = [bins.open_bin(out, Path(bins.source_val_file(n)).stem, 8) for n in ("general", "antivax")]
    assert all(p.dtype == np.uint32 for p in per_source)
    np.testing.assert_array_equal(val, np.concatenate(per_source))


def test_special_token_texts_are_removed_before_encoding(tmp_path, shared_data):
    """ "</s>" and "[SEP]" inside a message would be encoded as those special tokens (EOS as a false message
    boundary): cleaning removes them, here with --remove-symbols off, which keeps `<`, `/` and `>`."""
    folder = make_tokenizer(tmp_path / "tok", shared_data / "fakewhatsapp_br.csv", 3000, "</s>", ("[SEP]",))
    csv = tmp_path / "in.csv"
    messages = ["olá </s> mundo das vacinas", "fim[SEP]do texto de teste", "sem nada especial aqui"]
    pl.DataFrame({"id": ["1", "2", "3"], "channel_id": "1", "date": "2021-01-01", "message": messages}).write_csv(csv)
    out = tmp_path / "out"
    cfg = PrepareConfig(inputs=[str(csv)], out=str(out), tokenizer=str(folder), remove_symbols=False, val_fraction=0.0)
    meta = prepare(cfg, track=False)
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    kept = expected_messages(pl.Series(messages), CleanRules(remove_symbols=False, drop_texts=("</s>", "[SEP]")))
    assert kept == ["olá mundo das vacinas", "fimdo texto de teste", "sem nada especial aqui"]
    np.testing.assert_array_equal(tokens, own_encoding(folder, kept, meta.eot_token))
    assert int((tokens == meta.eot_token).sum()) == 3


# ----------------------------------------------------------------------------------------- bad --tokenizer
def no_eos_tokenizer(tmp_path: Path, shared_data: Path) -> Path:
    return make_tokenizer(tmp_path / "no-eos", shared_data / "fakewhatsapp_br.csv", 2000, eos_token="")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, s: d / "missing", "--tokenizer {}: no such folder"),
        (lambda d, s: d, "--tokenizer {}: the folder holds no tokenizer files"),
        (lambda d, s: "someone/not-cached-model", "--tokenizer {}: no such folder, nor a model in the local"),
        (no_eos_tokenizer, "--tokenizer {}: the tokenizer has no EOS token"),
    ],
    ids=["missing-folder", "no-tokenizer-files", "hub-name-not-cached", "no-eos"],
)
def test_bad_tokenizer_is_one_line_exit_2(tmp_path, shared_data, capsys, make, message):
    spec = make(tmp_path, shared_data)
    if spec == tmp_path:
        (tmp_path / "config.json").write_text("{}")  # a folder with other files, none a tokenizer's
    csv = shared_data / "fakewhatsapp_br-naive.csv"
    assert cli.main(["prepare", str(csv), "--out", str(tmp_path / "out"), "--tokenizer", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fakegpt prepare: error: ")
    assert message.format(spec) in err[0]
    assert not (tmp_path / "out").exists()  # refused before any work


# ------------------------------------------------------------------------------------ check_same_tokenizer
def test_check_same_tokenizer(
    tmp_path, prepared_big, prepared_whatsapp, big_tokenizer, small_tokenizer, tiny_model_dir
):
    big, gpt2 = DatasetMeta.load(prepared_big), DatasetMeta.load(prepared_whatsapp)
    hf_tokenizer.check_same_tokenizer(big, big_tokenizer, "--data-dir X")
    hf_tokenizer.check_same_tokenizer(gpt2, tiny_model_dir, "--data-dir X")  # fakegpt's GPT-2 files
    hf_tokenizer.check_same_tokenizer(gpt2, "gpt2", "--data-dir X")
    hf_tokenizer.check_same_tokenizer(gpt2, "scratch", "--data-dir X")
    # a model folder without tokenizer files is GPT-2, as fakegpt always took it to be
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    hf_tokenizer.check_same_tokenizer(gpt2, bare, "--data-dir X")
    # a meta.json from before the tokenizer record holds GPT-2 ids
    old = DatasetMeta.from_dict({k: v for k, v in gpt2.to_dict().items() if k != "tokenizer"})
    assert old.tokenizer == {} and "tokenizer" not in old.to_dict()
    hf_tokenizer.check_same_tokenizer(old, tiny_model_dir, "--data-dir X")
    damaged = DatasetMeta.from_dict({**gpt2.to_dict(), "tokenizer": {"name": "gpt2"}})
    with pytest.raises(FakegptError, match="meta.json of dataset 'prepared-whatsapp.*': incomplete tokenizer record"):
        hf_tokenizer.check_same_tokenizer(damaged, tiny_model_dir, "--data-dir X")
    # the same tokenizer saved again (other bytes, another tokenizer_config.json) still matches its bins
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    data = json.loads((big_tokenizer / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 0}
    (resaved / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((big_tokenizer / "tokenizer_config.json").read_text())
    (resaved / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 2048}))
    assert hf_tokenizer.tokenizer_sha256(resaved) != hf_tokenizer.tokenizer_sha256(big_tokenizer)
    hf_tokenizer.check_same_tokenizer(big, resaved, "--data-dir X")
    # another EOS is another tokenizer, whatever the vocabulary
    other_eos = backend(big_tokenizer).id_to_token(500)
    (resaved / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": other_eos}))
    with pytest.raises(FakegptError, match="bins made with tokenizer"):
        hf_tokenizer.check_same_tokenizer(big, resaved, "--data-dir X")
    described = {
        tiny_model_dir: f"gpt2 (sha256 {hf_tokenizer.gpt2_identity().sha256[:12]})",
        big_tokenizer: f"{big_tokenizer} (sha256 {hf_tokenizer.tokenizer_sha256(big_tokenizer)[:12]})",
        small_tokenizer: f"{small_tokenizer} (sha256 {hf_tokenizer.tokenizer_sha256(small_tokenizer)[:12]})",
    }
    for meta, made_with, model, again in (
        (big, big_tokenizer, tiny_model_dir, "gpt2"),
        (gpt2, tiny_model_dir, big_tokenizer, big_tokenizer),
        (big, big_tokenizer, small_tokenizer, small_tokenizer),
    ):
        with pytest.raises(FakegptError) as exc:
            hf_tokenizer.check_same_tokenizer(meta, model, "--data-dir X")
        assert str(exc.value) == (
            f"--data-dir X: bins made with tokenizer {described[made_with]}, the model's ({model}) is "
            f"{described[model]}; prepare again with --tokenizer {again}"
        )


# ------------------------------------------------------------------------------- refused by finetune, score
def _one_error_line(capsys, stage: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and " INFO mlflow" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fakegpt {stage}: error: ")
    return lines[0]


def test_finetune_refuses_bins_of_another_tokenizer(tmp_path, prepared_small, small_tokenizer, tiny_model_dir, capsys):
    argv = ["finetune", "--data-dir", str(prepared_small), "--init-from", str(tiny_model_dir), "--out-dir", "ft"]
    assert cli.main([*argv, "--device", "cpu", "--block-size", "32", "--max-iters", "1"]) == 2
    line = _one_error_line(capsys, "finetune")
    gpt2 = f"gpt2 (sha256 {hf_tokenizer.gpt2_identity().sha256[:12]})"
    assert f"--data-dir {prepared_small}: bins made with tokenizer {small_tokenizer} (sha256 " in line
    assert line.endswith(f"the model's ({tiny_model_dir}) is {gpt2}; prepare again with --tokenizer gpt2")
    assert not (tmp_path / "ft").exists()
    # from scratch: fakegpt's GPT-2 shape
    assert cli.main(["finetune", "--data-dir", str(prepared_small), "--init-from", "scratch", "--out-dir", "ft"]) == 2
    assert f"the model's (scratch) is {gpt2}" in _one_error_line(capsys, "finetune")


def test_score_refuses_bins_of_another_tokenizer(tmp_path, prepared_small, prepared_whatsapp, tiny_model_dir, capsys):
    claims = tmp_path / "claims.txt"
    claims.write_text("As vacinas alteram o DNA humano.\n")
    argv = ["score", "--models", str(tiny_model_dir), "--claims", str(claims), "--device", "cpu", "--out-dir", "sc"]
    for flag, extra in (
        ("--data-dir", ["--data-dir", str(prepared_small)]),
        ("--general-data", ["--data-dir", str(prepared_whatsapp), "--general-data", str(prepared_small)]),
    ):
        assert cli.main([*argv, *extra]) == 2
        line = _one_error_line(capsys, "score")
        assert f"{flag} {prepared_small}: bins made with tokenizer" in line and str(tiny_model_dir) in line
    assert not (tmp_path / "sc").exists()
