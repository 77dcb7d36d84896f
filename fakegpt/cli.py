"""`fakegpt STAGE [flags]`: one subcommand per stage, each a `main(argv)` in its own module.

Stage modules are imported lazily so that `fakegpt prepare` does not pay for importing torch.
A FakegptError anywhere becomes one line on stderr and exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import logging
import sys

from fakegpt import __version__
from fakegpt.errors import FakegptError

# stage -> (module, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("fakegpt.prepare", "Telegram CSV exports -> cleaned GPT-2 token bins (train.bin, val.bin, meta.json)"),
    "finetune": ("fakegpt.train", "fine-tune a GPT-2 model on prepared token bins, tracked in MLflow"),
    "sample": ("fakegpt.sample", "sample a grid of prompts x temperatures x models into tables and a report"),
    "score": ("fakegpt.score", "claim-likelihood scores: log p(false claim) - log p(correction)"),
    "labels": ("fakegpt.labels", "export / import / aggregate human label sheets for samples"),
    "chat": ("fakegpt.chat", "interactive prompt for one model"),
    "tune": ("fakegpt.tune", "Optuna study over learning rate and gradient accumulation"),
    "pipeline": ("fakegpt.pipeline", "the whole chain prepare -> finetune -> sample -> score (MLproject `main`)"),
    "mixture": ("fakegpt.series", "the dose-response series over anti-vaccine fractions"),
    "validate": ("fakegpt.validate", "positive/negative controls for the claim score"),
}


def _usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = [f"usage: fakegpt STAGE [flags]   (fakegpt {__version__})", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "`fakegpt STAGE --help` lists a stage's flags; `--config FILE.yaml` loads them from YAML."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"fakegpt: error: unknown stage {stage!r} (stages: {', '.join(STAGES)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = importlib.import_module(STAGES[stage][0])
        result = module.main(rest)
        return int(result or 0)
    except FakegptError as exc:
        print(f"fakegpt {stage}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file/disk problem the stage did not anticipate: still one line, naming the file
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"fakegpt {stage}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fakegpt {stage}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
