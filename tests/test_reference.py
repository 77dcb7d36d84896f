"""docs/reference.md: generated from the config dataclasses, current, and listing what the CLI accepts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fakegpt import config
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.mlproject import load_class
from fakegpt.reference import hand_configs, render
from fakegpt.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def sections(page: str) -> dict[str, str]:
    """The page's text under each `## fakegpt STAGE` / `### fakegpt STAGE SUB` heading."""
    out: dict[str, str] = {}
    for block in page.split("\n## ")[1:]:
        head, _, body = block.partition("\n")
        out[head] = body
        for sub in body.split("\n### ")[1:]:
            sub_head, _, sub_body = sub.partition("\n")
            out[sub_head] = sub_body
    return out


def test_the_stage_reference_is_current():
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == render(), "docs/reference.md is out of date: python -m fakegpt.reference > docs/reference.md"


def test_every_flag_the_cli_parses_is_in_its_stage_table_with_its_help():
    """The flags come from the argparse parser each stage really builds, not from the page's own generator."""
    page = sections(render())
    checked = 0
    for stage in STAGES:
        commands = (
            {f"fakegpt {stage.name}": load_class(stage.configs[0])}
            if stage.configs
            else {f"fakegpt {c}": cls for c, cls in hand_configs(stage).items()}
        )
        for heading, cls in commands.items():
            parser = config.build_parser(cls, heading)
            flags = {opt for action in parser._actions for opt in action.option_strings}
            flags -= {"-h", "--help", "--config", "--experiment"}
            body = page[heading]
            rows = {line.split("`")[1]: line for line in body.splitlines() if line.startswith("| `")}
            for flag in flags:
                row = next((r for name, r in rows.items() if name == flag or name.endswith(f"(or {flag})")), None)
                assert row is not None, f"{heading}: {flag} is not in docs/reference.md"
                field = next(f for f in dataclasses.fields(cls) if config.flag_name(f.name) == flag)
                assert field.metadata.get("help", "").split(" ")[0] in row
                checked += 1
    assert checked > 150


def test_a_row_shows_the_type_and_the_default_the_stage_uses():
    rows = {line.split("`")[1]: line for line in sections(render())["fakegpt finetune"].splitlines() if "| `" in line}
    assert rows["--learning-rate"].startswith(f"| `--learning-rate` | float | `{FinetuneConfig().learning_rate}` |")
    assert rows["--compile"].startswith("| `--compile` | true\\|false or unset |  | ")  # no default: by device
    assert rows["--nproc-per-node"].startswith("| `--nproc-per-node` | int | `1` |")
