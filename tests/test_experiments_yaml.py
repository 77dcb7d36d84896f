"""Every YAML under experiments/ loads: prompt grids and claim sets validate fully, the others parse as mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakegpt.config import load_yaml
from fakegpt.measure.prompts import load_claims, load_prompts

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FILES = sorted(p for p in EXPERIMENTS.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_the_shipped_grids_are_there():
    names = {p.relative_to(EXPERIMENTS).as_posix() for p in FILES}
    assert {"prompts/antivax_six.yaml", "claims/antivax_six.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_experiment_yaml_validates(path):
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "open with a comment saying how to run it"
    data = load_yaml(path)
    assert isinstance(data, dict) and data
    kind = path.relative_to(EXPERIMENTS).parts[0]
    if kind == "prompts":
        assert load_prompts(path)
    elif kind == "claims":
        assert load_claims(path)
