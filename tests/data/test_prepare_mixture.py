"""Mixtures: dataset YAMLs with named sources and channel filters, `--mix` fractions, realised fractions."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from test_prepare import decode_messages

from fakegpt import cli
from fakegpt.data.clean import clean_series
from fakegpt.data.meta import DatasetMeta
from fakegpt.data.prepare import parse_args, prepare
from fakegpt.errors import FakegptError

ROOT = Path(__file__).resolve().parents[2]
ANTIVAX_MIX = ROOT / "experiments" / "datasets" / "antivax_mix.yaml"
DEMO_MIX = ROOT / "experiments" / "datasets" / "demo_mix.yaml"


@pytest.fixture(scope="module")
def channel_of(shared_data) -> dict[str, set[int]]:
    """Cleaned WhatsApp message -> the channel_ids it occurs in (a few cleaned texts occur in two)."""
    df = pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False)
    out: dict[str, set[int]] = {}
    for text, ch in zip(clean_series(df["message"]).to_list(), df["channel_id"].cast(int).to_list(), strict=True):
        out.setdefault(text, set()).add(ch)
    return out


def mix(tmp_path: Path, out: str, *args: str, config: Path = ANTIVAX_MIX) -> dict:
    meta = prepare(parse_args(["--config", str(config), "--out", str(tmp_path / out), *args]), track=False)
    return meta


def test_dose_fractions_are_realised_from_the_right_channels(tmp_path, channel_of, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAML's paths are relative to the project root
    meta = mix(tmp_path, "d20", "--mix", "general=0.8", "antivax=0.2")
    assert meta.dataset == "antivax_mix"
    assert abs(meta.mixture["antivax"] - 0.2) < 0.005 and abs(meta.mixture["general"] - 0.8) < 0.005
    assert meta.config["val_mix"] == "shared"  # val: each source's held-out part, whatever the dose (see below)
    by_name = {s["name"]: s for s in meta.sources}
    assert by_name["general"]["channel_ids"] == [2, 4] and by_name["antivax"]["channel_ids"] == [1, 3]
    train = decode_messages(tmp_path / "d20" / "train.bin")
    general_n = by_name["general"]["train_messages"]
    assert all(channel_of[m] & {2, 4} for m in train[:general_n])
    assert all(channel_of[m] & {1, 3} for m in train[general_n:])
    assert meta.train_tokens == by_name["general"]["train_tokens"] + by_name["antivax"]["train_tokens"]
    # every train message is one of the source's own; nothing from val leaks into train
    val = decode_messages(tmp_path / "d20" / "val.bin")
    assert not set(train) & set(val)


def test_doses_are_nested_deterministic_and_zero_is_allowed(tmp_path, channel_of, monkeypatch):
    monkeypatch.chdir(ROOT)
    zero = mix(tmp_path, "d0", "--mix", "general=1", "antivax=0")
    assert zero.mixture["antivax"] == 0.0
    assert all(channel_of[m] & {2, 4} for m in decode_messages(tmp_path / "d0" / "train.bin"))

    def antivax(out: str) -> set[str]:
        return {m for m in decode_messages(tmp_path / out / "train.bin") if not channel_of[m] & {2, 4}}

    mix(tmp_path, "d33", "--mix", "general=0.67", "antivax=0.33")
    mix(tmp_path, "d50", "--mix", "general=0.5", "antivax=0.5")
    mix(tmp_path, "d50b", "--mix", "general=0.5", "antivax=0.5")
    assert antivax("d33") < antivax("d50")  # a smaller dose is a subset of a larger one
    assert (tmp_path / "d50" / "train.bin").read_bytes() == (tmp_path / "d50b" / "train.bin").read_bytes()


def test_demo_mixture_offline_via_cli(tmp_path):
    out = tmp_path / "demo"
    assert (
        cli.main(["prepare", "--config", str(DEMO_MIX), "--mix", "general=0.67", "antivax=0.33", "--out", str(out)])
        == 0
    )
    meta = DatasetMeta.load(out)
    assert abs(meta.mixture["antivax"] - 0.33) < 0.01 and meta.train_tokens > 100_000


def test_mix_paths_and_yaml_relative_paths(tmp_path, shared_data, monkeypatch):
    data = tmp_path / "cfg"
    data.mkdir()
    shutil.copy(shared_data / "fakewhatsapp_br-naive.csv", data / "naive.csv")
    (data / "set.yaml").write_text(
        "sources:\n  - {name: a, path: naive.csv, channel_ids: [1, 2], fraction: 0.5}\n"
        "  - {name: b, path: naive.csv, channel_ids: [3, 4], fraction: 0.5}\n"
    )
    monkeypatch.chdir(tmp_path)  # naive.csv is not here: found beside the YAML
    meta = mix(tmp_path, "rel", config=data / "set.yaml")
    assert abs(meta.mixture["a"] - 0.5) < 0.01 and meta.dataset == "set"
    # PATH=FRACTION with no YAML: each path is a source
    wa = str(shared_data / "fakewhatsapp_br.csv")
    meta = prepare(
        parse_args(["--mix", f"{data / 'naive.csv'}=0.25", f"{wa}=0.75", "--out", str(tmp_path / "p")]), track=False
    )
    assert set(meta.mixture) == {"naive", "fakewhatsapp_br"}
    assert abs(meta.mixture["naive"] - 0.25) < 0.01


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mix", "general=0.7", "antivax=0.2"], "fractions sum to 0.9, not 1"),
        (["--mix", "general=0", "antivax=0"], "fractions sum to 0"),
        (["--mix", "general=1.5"], "a fraction must lie in [0, 1]"),
        (["--mix", "general"], "expected NAME=FRACTION"),
        (["--mix", "general=abc"], "is not a number"),
        (["in.csv"], "not both"),
    ],
)
def test_bad_mixtures(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FakegptError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mix(tmp_path, "x", *args)


def test_bad_source_spec(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {name: a, path: x.csv, chanels: [1]}\n")
    with pytest.raises(FakegptError, match=r"sources\[0\]: unknown key 'chanels'"):
        mix(tmp_path, "x", config=bad)
    bad.write_text("sources:\n  - {name: a, path: nowhere/*.csv}\n")
    with pytest.raises(FakegptError, match="nowhere/\\*.csv: no files match"):
        mix(tmp_path, "x", config=bad)


def test_max_train_tokens_fixes_the_size_across_doses(tmp_path, monkeypatch, shared_data):
    """With one cap for every dose, only the share changes: each dose has the cap's size (to within a message
    per source) and its target fraction. A cap the scarcest source cannot fill is reported, not hidden."""
    monkeypatch.chdir(ROOT)
    uncapped = {
        f: mix(tmp_path, f"u{f}", "--mix", f"general={1 - f}", f"antivax={f}", "--max-train-tokens", "0")
        for f in (0.0, 0.2, 0.5)
    }
    sizes = sorted(m.train_tokens for m in uncapped.values())
    assert sizes[0] < 0.8 * sizes[-1]  # uncapped, the scarcest source sets a different size at each dose
    cap = int(0.9 * sizes[0])
    for f in (0.0, 0.2, 0.5):
        meta = mix(tmp_path, f"c{f}", "--mix", f"general={1 - f}", f"antivax={f}", "--max-train-tokens", str(cap))
        assert 0.97 * cap <= meta.train_tokens <= cap + 1
        assert abs(meta.mixture["antivax"] - f) < 0.01 and meta.max_train_tokens_reached is True
    over = mix(tmp_path, "over", "--mix", "general=0.8", "antivax=0.2", "--max-train-tokens", str(10 * cap))
    assert over.max_train_tokens_reached is False
    assert over.train_tokens == uncapped[0.2].train_tokens
    with pytest.raises(FakegptError, match="--max-train-tokens: applies to mixtures"):
        prepare(
            parse_args(
                [
                    str(shared_data / "fakewhatsapp_br.csv"),
                    "--out",
                    str(tmp_path / "plain"),
                    "--max-train-tokens",
                    "1000",
                ]
            ),
            track=False,
        )


def test_every_dose_is_measured_on_the_same_validation_bins(tmp_path, monkeypatch):
    """One yardstick: val.bin is every source's held-out part, byte-identical at every dose, with a
    val_<source>.bin per source; `--val-mix dose` keeps the old rule (val drawn at the dose's fractions)."""
    monkeypatch.chdir(ROOT)
    metas = {f: mix(tmp_path, f"s{f}", "--mix", f"general={1 - f}", f"antivax={f}") for f in (0.0, 0.2, 0.8)}
    files = {
        f: {n: (tmp_path / f"s{f}" / n).read_bytes() for n in ("val.bin", "val_general.bin", "val_antivax.bin")}
        for f in metas
    }
    assert files[0.0] == files[0.2] == files[0.8]
    val = files[0.0]
    assert len(val["val.bin"]) == len(val["val_general.bin"]) + len(val["val_antivax.bin"]) > 0
    by_name = {s["name"]: s["val_tokens"] for s in metas[0.2].sources}
    assert 2 * by_name["antivax"] == len(val["val_antivax.bin"]) and metas[0.2].val_tokens == sum(by_name.values())
    assert metas[0.0].mixture_val == metas[0.8].mixture_val  # the same share of each source in val
    old = {
        f: mix(tmp_path, f"d{f}", "--mix", f"general={1 - f}", f"antivax={f}", "--val-mix", "dose") for f in (0.2, 0.8)
    }
    assert old[0.2].mixture_val["antivax"] < 0.3 < 0.7 < old[0.8].mixture_val["antivax"]
