"""Damaged and hostile inputs, stage by stage, through `fakegpt.cli.main`.

Every case is built here from ../shared/data and tiny models, and must end the same way: exit status 2, exactly
one line on stderr (`fakegpt STAGE: error: ...`) naming the file or flag, no traceback, nothing left behind,
and nothing that existed before changed (a filled label sheet, a prepared dataset, a model stay byte-identical).
A new stage joins the catalogue with its own list of cases below.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fakegpt import cli

# MLflow keeps its record of a run that started and failed; that record is not a left-over output.
IGNORED = {"mlruns", "mlflow.db"}
MLFLOW_INFO = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow[.\w]*: ")


@dataclass
class Ctx:
    root: Path  # the user's working folder for the case (also the cwd)
    small_csv: Path  # 400 real WhatsApp messages
    model: Path  # a copy of the tiny GPT-2 (n_positions 256)
    data: Path  # a prepared dataset of small_csv
    samples: Path  # a sample folder (samples.parquet)
    sheet: Path  # a label sheet people have filled in


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]  # writes its damaged inputs under ctx.root; returns the argv
    names: tuple[str, ...]  # what the error line must name
    defect: bool  # True: a case that once gave a traceback, exit 0 or lost work


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders`, with the sha256 of each file."""
    out: dict[str, str] = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in IGNORED]
            out[dirpath] = "dir"
            for name in filenames:
                if name not in IGNORED:
                    path = Path(dirpath) / name
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_refused(argv: list[str], names: tuple[str, ...], capsys, *folders: Path) -> str:
    """Run the CLI; assert exit 2, one error line naming `names`, and no change under `folders`."""
    before = snapshot(*folders)
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    # MLflow's own INFO records (a stage that got as far as starting its run) are progress, not the error
    lines = [line for line in err.splitlines() if line.strip() and not MLFLOW_INFO.match(line)]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fakegpt {argv[0]}: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert snapshot(*folders) == before
    return lines[0]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Built once: a small real CSV, a tiny model, its prepared dataset, a sample table."""
    from tiny_runs import make_tiny_model

    from fakegpt.data.prepare import PrepareConfig, prepare

    base = tmp_path_factory.mktemp("bad-input-assets")
    small = base / "whatsapp_small.csv"
    pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False).head(400).write_csv(small)
    model = make_tiny_model(base / "model")
    data = base / "data"
    prepare(PrepareConfig(inputs=[str(small)], out=str(data)), track=False)
    samples = base / "samples"
    samples.mkdir()
    pl.DataFrame(
        {
            "sample_id": [f"s{i:03d}" for i in range(6)],
            "model": ["gpt2"] * 6,
            "temperature": [0.8] * 6,
            "topic": ["dna"] * 6,
            "framing": ["neutral"] * 6,
            "language": ["pt"] * 6,
            "prompt": ["As vacinas alteram o DNA?"] * 6,
            "completion": [f" resposta {i}" for i in range(6)],
        }
    ).write_parquet(samples / "samples.parquet")
    return {"small": small, "model": model, "data": data, "samples": samples}


@pytest.fixture
def ctx(tmp_path, assets, monkeypatch) -> Ctx:
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.chdir(root)
    model = root / "model"
    shutil.copytree(assets["model"], model)
    data = root / "data"
    shutil.copytree(assets["data"], data)
    samples = root / "samples"
    shutil.copytree(assets["samples"], samples)
    sheet = root / "sheet.csv"
    table = pl.read_parquet(samples / "samples.parquet")
    table.select("sample_id", "prompt", "completion").with_columns(label=pl.lit("adopts"), note=pl.lit("ok")).write_csv(
        sheet
    )
    return Ctx(root=root, small_csv=assets["small"], model=model, data=data, samples=samples, sheet=sheet)


# ------------------------------------------------------------------------------------------------ builders
def latin1(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def truncated_weights(c: Ctx) -> Path:
    w = c.model / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return w


def garbled_weights(c: Ctx) -> Path:
    w = c.model / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[8:40] = b"\x00garbage-not-a-json-header\xff\xfe\x00\x01\x02\x03"
    w.write_bytes(bytes(raw))
    return w


def binary_csv(c: Ctx) -> Path:
    """A spreadsheet (.xlsx: a zip) given instead of its CSV export; a CR before the first LF, as in most
    binary files, used to crash the header check with a traceback."""
    path = c.root / "export.csv"
    path.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\r\x8a" + bytes(range(255, -1, -1)) * 200)
    return path


def cr_only_csv(c: Ctx) -> Path:
    path = c.root / "mac.csv"
    path.write_bytes(c.small_csv.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r"))
    return path


def too_short_csv(c: Ctx) -> Path:
    """Rows whose messages are all dropped by cleaning: the failure comes after reading, mid-run."""
    path = c.root / "short.csv"
    path.write_text("id,channel_id,date,message\n1,1,2020-01-01T00:00:00,a\n2,1,2020-01-02T00:00:00,b\n")
    return path


def header_only_csv(c: Ctx) -> Path:
    path = c.root / "empty.csv"
    path.write_text("id,channel_id,date,message\n", encoding="utf-8")
    return path


def mix_yaml(c: Ctx, channels: tuple[int, int]) -> Path:
    path = c.root / "mix.yaml"
    path.write_text(
        "name: mix\nsources:\n"
        f"  - {{name: general, path: {c.small_csv}, channel_ids: [{channels[0]}], fraction: 0.8}}\n"
        f"  - {{name: antivax, path: {c.small_csv}, channel_ids: [{channels[1]}], fraction: 0.2}}\n",
        encoding="utf-8",
    )
    return path


def long_claims(c: Ctx) -> Path:
    path = c.root / "claims.txt"
    path.write_text("As vacinas alteram o DNA humano. " * 60 + "\n", encoding="utf-8")
    return path


def data_with_val(c: Ctx, tokens: np.ndarray) -> Path:
    tokens.astype(np.uint16).tofile(c.data / "val.bin")
    return c.data


def bad_config_json(c: Ctx) -> Path:
    path = c.model / "config.json"
    path.write_text(path.read_text().replace('"n_positions": 256', '"n_positions": "lots"'), encoding="utf-8")
    return path


def grid_yaml(c: Ctx, encoding: str = "utf-8") -> Path:
    path = c.root / "grid.yaml"
    text = "# coment\u00e1rio\nname: t\nlanguages: [pt]\ntopics:\n  dna:\n    templates:\n"
    text += '      pt: {neutral: "Ol\u00e1"}\n'
    path.write_bytes(text.encode(encoding))
    return path


def damaged(damage: Callable[[Ctx], object], argv: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    """A builder that damages an input first, then gives the stage's argv."""

    def build(c: Ctx) -> list[str]:
        damage(c)
        return argv(c)

    return build


# ---------------------------------------------------------------------------------------------- catalogue
def _prepare_out(c: Ctx) -> str:
    return str(c.root / "ds")


PREPARE = [
    Case("binary-file", lambda c: ["prepare", str(binary_csv(c)), "--out", _prepare_out(c)], ("export.csv",), True),
    Case("cr-only-line-ends", lambda c: ["prepare", str(cr_only_csv(c)), "--out", _prepare_out(c)], ("mac.csv",), True),
    Case(
        "dataset-yaml-latin1",
        lambda c: ["prepare", "--config", str(latin1(c.root / "ds.yaml", "# f\u00e9\nname: x\n")), "--out", "o"],
        ("ds.yaml", "line 1", "UTF-8"),
        True,
    ),
    Case(
        "mixture-source-without-messages",
        lambda c: ["prepare", "--config", str(mix_yaml(c, (1, 99))), "--out", _prepare_out(c)],
        ("antivax", "channel_ids [99]"),
        True,
    ),
    Case(
        "no-usable-messages-new-folder",  # used to leave the empty output folder behind
        lambda c: ["prepare", str(too_short_csv(c)), "--out", str(c.root / "new" / "ds")],
        ("short.csv", "no usable messages"),
        True,
    ),
    Case(
        "existing-dataset-without-force",
        lambda c: ["prepare", str(c.small_csv), "--out", str(c.data)],
        ("already holds train.bin", "--force"),
        False,
    ),
    Case(
        "no-usable-messages-force-over-dataset",
        lambda c: ["prepare", str(too_short_csv(c)), "--out", str(c.data), "--force"],
        ("short.csv", "no usable messages"),
        False,
    ),
    Case("header-only", lambda c: ["prepare", str(header_only_csv(c)), "--out", "o"], ("empty.csv",), False),
    Case("missing-input", lambda c: ["prepare", "nope.csv", "--out", _prepare_out(c)], ("nope.csv",), False),
    Case(
        "val-fraction-nan",
        lambda c: ["prepare", str(c.small_csv), "--val-fraction", "nan", "--out", "o"],
        ("--val-fraction",),
        False,
    ),
    Case("chunk-mb-0", lambda c: ["prepare", str(c.small_csv), "--chunk-mb", "0"], ("--chunk-mb",), False),
]

LABELS = [
    Case(
        "export-over-filled-sheet",
        lambda c: ["labels", "export", "--samples", str(c.samples), "--sheet", str(c.sheet)],
        ("sheet.csv", "--force"),
        True,
    ),
    Case(
        "export-force-damaged-samples",
        lambda c: [
            "labels",
            "export",
            "--samples",
            str(latin1(c.root / "broken.parquet", "not parquet")),
            "--sheet",
            str(c.sheet),
            "--force",
        ],
        ("broken.parquet",),
        False,
    ),
    Case(
        "export-sheet-is-a-folder",
        lambda c: ["labels", "export", "--samples", str(c.samples), "--sheet", str(c.data)],
        ("--sheet", "folder"),
        True,  # named a temporary file instead
    ),
    Case(
        "import-missing-sheet",
        lambda c: ["labels", "import", "--samples", str(c.samples), "--sheet", "gone.csv", "--out-dir", "lab"],
        ("gone.csv",),
        False,
    ),
    Case(
        "aggregate-unknown-label",
        lambda c: [
            "labels",
            "aggregate",
            "--samples",
            str(c.samples),
            "--sheet",
            str(c.sheet),
            "--labels",
            "refutes",
            "--out-dir",
            "lab",
        ],
        ("sheet.csv", "row 2: unknown label 'adopts'", "row 7"),
        True,
    ),
]


def _sample(c: Ctx, *extra: str) -> list[str]:
    grid = c.root / "prompts.txt"
    grid.write_text("As vacinas alteram o DNA?\n", encoding="utf-8")
    return ["sample", "--models", str(c.model), "--prompts", str(grid), "--device", "cpu", "--out-dir", "s", *extra]


SAMPLE = [
    Case("truncated-weights", damaged(truncated_weights, _sample), ("model.safetensors",), True),
    Case("garbled-weights", damaged(garbled_weights, _sample), ("model.safetensors",), True),
    Case("config-json-damaged", damaged(bad_config_json, _sample), ("config.json",), True),
    Case(
        "prompt-grid-latin1",
        lambda c: [*_sample(c)[:4], str(grid_yaml(c, "latin-1")), *_sample(c)[5:]],
        ("grid.yaml", "line 1", "UTF-8"),
        True,
    ),
    Case(
        "prompt-text-latin1",
        lambda c: [*_sample(c)[:4], str(latin1(c.root / "p.txt", "Ol\u00e1\n")), *_sample(c)[5:]],
        ("p.txt", "UTF-8"),
        False,
    ),
    Case("temperature-nan", lambda c: _sample(c, "--temperatures", "nan"), ("--temperatures",), True),
    Case("temperature-negative", lambda c: _sample(c, "--temperatures", "-0.5"), ("--temperatures",), False),
    Case("top-p-zero", lambda c: _sample(c, "--top-p", "0"), ("--top-p",), False),
    Case("top-p-above-one", lambda c: _sample(c, "--top-p", "1.5"), ("--top-p",), False),
    Case("num-samples-zero", lambda c: _sample(c, "--num-samples", "0"), ("--num-samples",), False),
    Case(
        "max-new-tokens-beyond-context",  # refused before any model loads or run starts
        lambda c: _sample(c, "--max-new-tokens", "400"),
        ("--max-new-tokens", "256"),
        True,
    ),
]


def _score(c: Ctx, *extra: str) -> list[str]:
    claims = c.root / "claims.txt"
    if not claims.exists():
        claims.write_text("As vacinas alteram o DNA.\nAs vacinas salvam vidas.\n", encoding="utf-8")
    return ["score", "--models", str(c.model), "--claims", str(claims), "--device", "cpu", "--out-dir", "sc", *extra]


SCORE = [
    Case("truncated-weights", damaged(truncated_weights, _score), ("model.safetensors",), True),
    Case(
        "claims-yaml-latin1",
        lambda c: [*_score(c)[:4], str(latin1(c.root / "c.yaml", "# \u00e9\nname: x\n")), *_score(c)[5:]],
        ("c.yaml", "line 1", "UTF-8"),
        True,
    ),
    Case("claim-longer-than-context", damaged(long_claims, _score), ("claims.txt", "256"), True),
    Case(
        "val-bin-ids-beyond-vocabulary",
        lambda c: _score(c, "--data-dir", str(data_with_val(c, np.full(2000, 60000)))),
        ("val.bin", "60000"),
        True,
    ),
    Case(
        "val-bin-empty",
        lambda c: _score(c, "--data-dir", str(data_with_val(c, np.zeros(0)))),
        ("val.bin", "empty"),
        True,
    ),
    Case("batch-size-zero", lambda c: _score(c, "--batch-size", "0"), ("--batch-size",), False),
]


def _chat(c: Ctx, *extra: str) -> list[str]:
    return ["chat", "--model", str(c.model), "--device", "cpu", *extra]


CHAT = [
    Case("truncated-weights", damaged(truncated_weights, _chat), ("model.safetensors",), True),
    Case("max-new-tokens-beyond-context", lambda c: _chat(c, "--max-new-tokens", "5000"), ("--max-new-tokens",), True),
    Case("temperature-nan", lambda c: _chat(c, "--temperature", "nan"), ("--temperature",), True),
    Case("temperature-negative", lambda c: _chat(c, "--temperature", "-1"), ("--temperature",), False),
    Case("num-samples-zero", lambda c: _chat(c, "--num-samples", "0"), ("--num-samples",), False),
    Case("top-k-negative", lambda c: _chat(c, "--top-k", "-1"), ("--top-k",), False),
]


def _finetune(c: Ctx, *extra: str) -> list[str]:
    return ["finetune", "--data-dir", str(c.data), "--init-from", str(c.model), "--out-dir", "ft", "--device", "cpu"]


def text_vocab_size(c: Ctx) -> None:
    meta = c.data / "meta.json"
    meta.write_text(meta.read_text().replace('"vocab_size": 50257', '"vocab_size": "50257 ids"'), encoding="utf-8")


FINETUNE = [
    Case("meta-vocab-size-not-a-number", damaged(text_vocab_size, _finetune), ("meta.json", "vocab_size"), False),
    Case("empty-val-bin", damaged(lambda c: data_with_val(c, np.zeros(0)), _finetune), ("val.bin", "empty"), False),
    Case("truncated-weights", damaged(truncated_weights, _finetune), ("model.safetensors",), True),
    Case(
        "config-yaml-latin1",
        lambda c: [*_finetune(c), "--config", str(latin1(c.root / "ft.yaml", "# \u00e9\nmax_iters: 2\n"))],
        ("ft.yaml", "line 1"),
        True,
    ),
    Case(
        "learning-rate-nan",
        lambda c: [*_finetune(c), "--learning-rate", "nan"],
        ("--learning-rate",),
        True,
    ),
]

TUNE = [
    Case(
        "empty-val-bin",
        lambda c: ["tune", "--data-dir", str(data_with_val(c, np.zeros(0))), "--n-trials", "1", "--device", "cpu"],
        ("val.bin", "empty"),
        False,
    ),
    Case(
        "empty-val-bin",
        lambda c: ["tune", "--data-dir", str(data_with_val(c, np.zeros(0))), "--n-trials", "1", "--device", "cpu"],
        ("val.bin", "empty"),
        False,
    ),
    Case(
        "config-yaml-latin1",
        lambda c: ["tune", "--config", str(latin1(c.root / "sweep.yaml", "# \u00e9\n"))],
        ("sweep.yaml", "UTF-8"),
        True,
    ),
]

VALIDATE = [
    Case(
        "binary-base-data",  # used to leave its new --out-dir behind
        lambda c: ["validate", "--base-data", str(binary_csv(c)), "--out-dir", "vo"],
        ("export.csv", "binary"),
        True,
    ),
    Case(
        "base-channel-typo",  # the first dose's prepare fails: the new --out-dir goes with it
        lambda c: ["validate", "--base-data", str(c.small_csv), "--base-channel-ids", "77", "--out-dir", "vo"],
        ("channel_ids [77]", "no usable messages"),
        True,
    ),
    Case(
        "config-yaml-latin1",
        lambda c: ["validate", "--config", str(latin1(c.root / "v.yaml", "# \u00e9\n"))],
        ("v.yaml", "UTF-8"),
        True,
    ),
]

PIPELINE = [
    Case(
        "num-samples-zero-before-prepare",
        lambda c: ["pipeline", "--num-samples", "0", "--out-root", str(c.root / "out")],
        ("--num-samples",),
        True,
    ),
    Case(
        "prompt-grid-latin1-before-prepare",
        lambda c: ["pipeline", "--prompts", str(grid_yaml(c, "latin-1")), "--out-root", str(c.root / "out")],
        ("grid.yaml", "UTF-8"),
        True,
    ),
    Case(
        "relative-data-missing",  # named as the user wrote it, from their folder, before any step
        lambda c: ["pipeline", "--data", "exports/missing.csv", "--out-root", str(c.root / "out")],
        ("exports/missing.csv",),
        True,
    ),
    Case(
        "relative-binary-data",
        lambda c: ["pipeline", "--data", binary_csv(c).name, "--out-root", str(c.root / "out")],
        (str(Path("work") / "export.csv"),),
        True,
    ),
]

MIXTURE = [
    Case(
        "unknown-dose-source",
        lambda c: ["mixture", "--dose-source", "antivaxx", "--out-root", str(c.root / "out")],
        ("--dose-source", "antivaxx"),
        True,
    ),
    Case(
        "missing-label-sheet-before-series",
        lambda c: ["mixture", "--label-sheet", "filled.csv", "--out-root", str(c.root / "out")],
        ("--label-sheet", "filled.csv"),
        True,
    ),
    Case(
        "num-samples-zero-before-series",
        lambda c: ["mixture", "--num-samples", "0", "--out-root", str(c.root / "out")],
        ("--num-samples",),
        True,
    ),
    Case("fraction-above-one", lambda c: ["mixture", "--fractions", "0,1.5"], ("--fractions",), False),
]

CATALOGUE = {
    "prepare": PREPARE,
    "labels": LABELS,
    "sample": SAMPLE,
    "score": SCORE,
    "chat": CHAT,
    "finetune": FINETUNE,
    "tune": TUNE,
    "validate": VALIDATE,
    "pipeline": PIPELINE,
    "mixture": MIXTURE,
}
ALL = [pytest.param(case, id=f"{stage}:{case.id}") for stage, cases in CATALOGUE.items() for case in cases]


@pytest.mark.parametrize("case", ALL)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, ctx: Ctx, capsys):
    argv = case.build(ctx)  # the damaged inputs are written first: they are part of the "before"
    assert_refused(argv, case.names, capsys, ctx.root)


def test_the_catalogue_covers_every_stage():
    from fakegpt.stages import STAGES

    assert set(CATALOGUE) == {s.name for s in STAGES}


# --------------------------------------------------------------------------------------- lost work, races
def test_labels_export_force_replaces_only_with_a_complete_sheet(ctx: Ctx, capsys):
    before = ctx.sheet.read_bytes()
    argv = ["labels", "export", "--samples", str(ctx.samples), "--sheet", str(ctx.sheet)]
    assert_refused(argv, ("--force",), capsys, ctx.root)
    assert ctx.sheet.read_bytes() == before
    assert cli.main([*argv, "--force"]) == 0
    fresh = pl.read_csv(ctx.sheet, infer_schema=False)
    assert fresh.height == 6 and set(fresh["label"].fill_null("")) == {""}
    assert sorted(p.name for p in ctx.root.iterdir()) == ["data", "model", "samples", "sheet.csv"]


def test_prepare_force_failing_late_keeps_the_old_dataset(ctx: Ctx, capsys, monkeypatch):
    from fakegpt.data import prepare as prep

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, "_split_in_place", disk_full)
    argv = ["prepare", str(ctx.small_csv), "--out", str(ctx.data), "--force"]
    line = assert_refused(argv, (str(ctx.data), "No space left on device"), capsys, ctx.root)
    assert "unchanged" in line


def test_a_claimed_output_folder_refuses_a_second_run(ctx: Ctx, capsys):
    from fakegpt.files import lock_folder

    out = ctx.root / "ds"
    out.mkdir()
    fd = lock_folder(out)  # another run holds the folder
    try:
        assert_refused(["prepare", str(ctx.small_csv), "--out", str(out)], (str(out), "in use"), capsys, ctx.root)
    finally:
        os.close(fd)
    (out / ".work-killed.tmp").mkdir()  # what a SIGKILLed run leaves: the next run that claims the folder clears it
    assert cli.main(["prepare", str(ctx.small_csv), "--out", str(out)]) == 0  # released: the next run may
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_two_concurrent_prepares_into_one_folder_cannot_both_succeed(ctx: Ctx):
    import sys

    out = ctx.root / "ds"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "fakegpt", "prepare", str(ctx.small_csv), "--out", str(out), "--threads", "1"]
    procs = []
    for name in "ab":  # each its own MLflow store: this is about the output folder, not SQLite locking
        db = ctx.root.parent / f"mlflow-{name}.db"
        shutil.copyfile(ctx.root.parent / "mlflow.db", db)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
        procs.append(subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0 and codes[1] == 2, results
    loser = next(err for rc, err in results if rc == 2)
    assert str(out) in loser and ("in use" in loser or "already holds" in loser), loser
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.slow
def test_prepare_force_on_a_full_disk_keeps_the_old_dataset(tmp_path, shared_data, capsys):
    """A real ENOSPC: a 2 MiB tmpfs holds a small dataset; re-preparing it from 5 MB of text fills the disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        small = tmp_path / "small.csv"
        pl.read_csv(shared_data / "fakewhatsapp_br.csv", infer_schema=False).head(200).write_csv(small)
        out = disk / "ds"
        assert cli.main(["prepare", str(small), "--out", str(out)]) == 0
        argv = ["prepare", str(shared_data / "fakewhatsapp_br.csv"), "--out", str(out), "--force"]
        line = assert_refused(argv, (str(out), "No space left on device"), capsys, disk)
        assert "unchanged" in line
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------- chains
def test_child_steps_run_this_interpreter_whatever_is_on_path(monkeypatch, tmp_path):
    import sys

    from fakegpt.studies.main import child_python

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a shell where `python` is not this venv's
    with child_python():
        out = subprocess.run(
            ["bash", "-c", "python -c 'import sys; print(sys.executable)'"], capture_output=True, text=True
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == sys.executable
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_relative_paths_are_resolved_from_the_users_folder(ctx: Ctx):
    from fakegpt.studies.main import MainConfig, resolve_user_paths

    (ctx.root / "exports").mkdir()
    shutil.copy(ctx.small_csv, ctx.root / "exports" / "a.csv")
    (ctx.root / "my_prompts.txt").write_text("Ol\u00e1\n", encoding="utf-8")
    claims = "experiments/claims/antivax_six.yaml"
    cfg = resolve_user_paths(MainConfig(data="exports/*.csv,missing.csv", prompts="my_prompts.txt", claims=claims))
    assert cfg.data == f"{ctx.root}/exports/*.csv,{ctx.root}/missing.csv"
    assert cfg.prompts == str(ctx.root / "my_prompts.txt")
    assert cfg.claims == "experiments/claims/antivax_six.yaml"  # only in the checkout: the child finds it there
