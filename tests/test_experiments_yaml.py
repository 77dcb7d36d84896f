"""Every YAML under experiments/ loads into the dataclass of the stage that reads it, exactly as the CLI does."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakegpt import config
from fakegpt.data.prepare import PrepareConfig
from fakegpt.finetune import checks
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.measure.prompts import load_claims, load_prompts
from fakegpt.studies import tune
from fakegpt.studies.mixture import MixtureConfig
from fakegpt.studies.validate import ValidateConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
FILES = sorted(p for p in EXPERIMENTS.rglob("*") if p.suffix in (".yaml", ".yml"))
# folder under experiments/ -> the config dataclass its files are loaded into with `--config`
CONFIGS = {
    "datasets": PrepareConfig,
    "finetune": FinetuneConfig,
    "mixture": MixtureConfig,
    "validation": ValidateConfig,
}


def test_every_folder_is_covered():
    kinds = {p.relative_to(EXPERIMENTS).parts[0] for p in FILES}
    assert kinds == set(CONFIGS) | {"prompts", "claims", "sweeps"}
    names = {p.relative_to(EXPERIMENTS).as_posix() for p in FILES}
    assert {"prompts/antivax_six.yaml", "claims/antivax_six.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_experiment_yaml_loads_into_its_dataclass(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the files name each other relative to the project root, as their run lines do
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "open with a comment saying how to run it"
    kind = path.relative_to(EXPERIMENTS).parts[0]
    if kind == "prompts":
        assert load_prompts(path)
    elif kind == "claims":
        assert load_claims(path)
    elif kind == "sweeps":
        study, base, space, _ = tune.parse_args(["--config", str(path)])
        tune.check(study, base, space)
        assert isinstance(base, FinetuneConfig) and space
    else:
        cls = CONFIGS[kind]
        cfg = config.parse(cls, ["--config", str(path)], prog=f"test {kind}")
        data = config.load_yaml(path)
        assert isinstance(cfg, cls) and data and set(data) <= set(config.to_dict(cfg))
        if cls is FinetuneConfig:
            checks.check_numbers(cfg, world_size=1)
