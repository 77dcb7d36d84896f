"""`fakegpt STAGE [flags]`: one subcommand per stage (listed in fakegpt.stages), each a `main(argv)`.

Stage modules are imported only when run, so that `fakegpt prepare` does not pay for importing torch.
A FakegptError (or an OSError the stage did not anticipate) becomes one line on stderr and exit status 2;
Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import logging
import sys

from fakegpt import __version__
from fakegpt.errors import FakegptError, one_line
from fakegpt.stages import BY_NAME, STAGES


def _usage() -> str:
    width = max(len(s.name) for s in STAGES)
    lines = [f"usage: fakegpt STAGE [flags]   (fakegpt {__version__})", "", "stages:"]
    lines += [f"  {s.name.ljust(width)}  {s.description}" for s in STAGES]
    lines += ["", "`fakegpt STAGE --help` lists a stage's flags; `--config FILE.yaml` loads them from YAML."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `fakegpt STAGE ARGS...`; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BY_NAME:
        print(f"fakegpt: error: unknown stage {name!r} (stages: {', '.join(BY_NAME)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = importlib.import_module(BY_NAME[name].module)
        return int(module.main(rest) or 0)
    except (FakegptError, OSError) as exc:  # an OSError the stage did not anticipate still names its file
        print(f"fakegpt {name}: error: {one_line(exc, limit=10_000)}", file=sys.stderr)
        return int(getattr(exc, "exit_status", 2))  # 2, or 128 + signal for a run stopped by SIGTERM/SIGINT
    except KeyboardInterrupt:
        print(f"fakegpt {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
