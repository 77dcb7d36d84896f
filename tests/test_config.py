"""Config parsing: defaults < YAML < flags, unknown keys, booleans, lists, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fakegpt import config
from fakegpt.errors import FakegptError


@dataclass
class Demo:
    inputs: list[str] = field(default_factory=list, metadata={"positional": True})
    max_iters: int = 100
    learning_rate: float = 3e-5
    compile: bool | None = None
    decay_lr: bool = False
    temperatures: list[float] = field(default_factory=lambda: [0.8])
    out_dir: str = "out"


def test_defaults_yaml_then_flags(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("max_iters: 7\nlearning_rate: 1.0e-4\ndecay_lr: true\n")
    cfg = config.parse(Demo, ["a.csv", "b.csv", "--config", str(yml), "--max-iters", "9"], prog="t")
    assert cfg.inputs == ["a.csv", "b.csv"]
    assert cfg.max_iters == 9  # flag beats YAML
    assert cfg.learning_rate == 1e-4  # YAML beats default
    assert cfg.decay_lr is True
    assert cfg.out_dir == "out"


def test_parse_given_tells_given_from_default(tmp_path, monkeypatch):
    """`finetune --init-from resume` refuses a changed flag: it must know a flag given with its default value."""
    yml = tmp_path / "c.yaml"
    yml.write_text("learning_rate: 3.0e-5\n")  # the default, but written down
    cfg, given = config.parse_given(Demo, ["--config", str(yml), "--max-iters", "100", "--out-dir", "o"], prog="t")
    assert given == {"learning_rate", "max_iters", "out_dir"} and cfg.max_iters == 100
    assert config.parse_given(Demo, [], prog="t")[1] == frozenset()
    assert config.non_default_keys(Demo(max_iters=5, out_dir="out")) == {"max_iters"}
    # `mlflow run -P max_iters=100` passes only the parameters given, as --max_iters 100
    assert config.parse_given(Demo, ["--max_iters", "100"], prog="t")[1] == {"max_iters"}


def test_booleans_lists_and_optional():
    cfg = config.parse(Demo, ["--compile", "false", "--temperatures", "0.7,1.0", "1.3"], prog="t")
    assert cfg.compile is False
    assert cfg.temperatures == [0.7, 1.0, 1.3]
    assert config.parse(Demo, ["--compile", "none"], prog="t").compile is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compile", "maybe"], "--compile: expected true or false"),
        (["--max-iters", "1.5"], "--max-iters: expected an integer"),
        (["--learning-rate", "fast"], "--learning-rate: expected a number"),
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(FakegptError, match=message):
        config.parse(Demo, argv, prog="t")


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("max_iters: 3\nmax_iter: 4\n")
    with pytest.raises(FakegptError, match=r"bad\.yaml: unknown key 'max_iter'"):
        config.parse(Demo, ["--config", str(yml)], prog="t")


def test_bad_yaml_names_line(tmp_path):
    yml = tmp_path / "broken.yaml"
    yml.write_text("max_iters: 3\n  oops: [\n")
    with pytest.raises(FakegptError, match=r"broken\.yaml: line \d+ invalid YAML"):
        config.parse(Demo, ["--config", str(yml)], prog="t")


def test_missing_config_file():
    with pytest.raises(FakegptError, match=r"nope\.yaml: no such file"):
        config.parse(Demo, ["--config", "nope.yaml"], prog="t")


def test_field_names_as_flags_as_mlflow_run_passes_them(tmp_path):
    """`mlflow run -P max_iters=100` appends `--max_iters 100`: underscores work like dashes, and win over YAML."""
    yml = tmp_path / "c.yaml"
    yml.write_text("max_iters: 7\nlearning_rate: 0.5\n")
    cfg = config.parse(Demo, ["--config", str(yml), "--max_iters", "100"], prog="t")
    assert (cfg.max_iters, cfg.learning_rate) == (100, 0.5)
    assert config.parse(Demo, ["--max_iters=3"], prog="t").max_iters == 3
    with pytest.raises(FakegptError, match="unrecognized arguments: --no-such-field"):
        config.parse(Demo, ["--no_such_field", "1"], prog="t")


def test_cli_reports_errors_in_one_line(capsys):
    from fakegpt.cli import main

    assert main(["nosuchstage"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown stage 'nosuchstage'" in err


def test_every_stage_has_help(capsys):
    """`fakegpt STAGE --help` works for every stage (help strings are %-formatted by argparse)."""
    from fakegpt.cli import main
    from fakegpt.stages import BY_NAME

    for stage in BY_NAME:
        try:
            code = main([stage, "--help"])
        except SystemExit as exc:  # argparse exits after printing help
            code = exc.code
        assert code == 0, stage
        assert "usage: fakegpt" in capsys.readouterr().out, stage


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_numbers_are_refused_naming_the_flag(text):
    from dataclasses import dataclass

    from fakegpt.config import parse

    @dataclass
    class Cfg:
        temperature: float = 0.8

    with pytest.raises(FakegptError, match="--temperature: expected a finite number"):
        parse(Cfg, [f"--temperature={text}"], prog="x")
