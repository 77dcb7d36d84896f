"""Typed stage configurations: dataclass fields <- YAML file <- command-line flags.

Every stage declares a dataclass. Its field names are the YAML keys, the MLproject parameter names and, with
`-` for `_`, the flags (`max_iters` -> `--max-iters`). `--config FILE.yaml` loads the same keys and flags
override it. An unknown key is an error naming the file and key; booleans are written `true`/`false`;
list fields take comma-separated values (`--temperatures 0.7,1.0`) or several words (`--mix a.csv=0.8 b.csv=0.2`).
Help text lives in each field's metadata: `field(default=..., metadata={"help": "..."})`. A field with
`metadata={"positional": True}` is a positional argument (e.g. prepare's INPUT files).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fakegpt.errors import FakegptError
from fakegpt.files import read_text

T = TypeVar("T")

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_NONE = {"none", "null", ""}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is Optional) for `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or string value to the field type `tp`; `where` names the flag/key for errors."""
    inner, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise FakegptError(f"{where}: a value is required")
    origin = typing.get_origin(inner)
    if origin is list:
        (item_tp,) = typing.get_args(inner) or (str,)
        items: list[Any] = []
        if isinstance(value, dict) and item_tp is str:  # a YAML mapping for a KEY=VALUE list (`columns:`, `mix:`)
            value = [f"{k}={v}" for k, v in value.items()]
        raw = value if isinstance(value, (list, tuple)) else [value]
        for item in raw:
            if isinstance(item, str):
                items.extend(p.strip() for p in item.split(",") if p.strip())
            else:
                items.append(item)
        return [coerce(i, item_tp, where) for i in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise FakegptError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if inner is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise FakegptError(f"{where}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise FakegptError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise FakegptError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise FakegptError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if inner is float:
        if isinstance(value, bool):
            raise FakegptError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise FakegptError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # no setting of any stage means anything with NaN or infinity
            raise FakegptError(f"{where}: expected a finite number, got {value!r}")
        return number
    if inner is str:
        if isinstance(value, (dict, list)):
            raise FakegptError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if inner is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {where}")  # a programming error, not user input


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def normalise_flags(argv: list[str] | None) -> list[str] | None:
    """`--learning_rate` -> `--learning-rate`: `mlflow run -P learning_rate=...` passes field names as flags."""
    if argv is None:
        return None
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def flag_name(name: str) -> str:
    """The command-line flag of config field `name` (`max_iters` -> `--max-iters`)."""
    return "--" + name.replace("_", "-")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a one-line error."""
    path = Path(path)
    text = read_text(path)  # missing, unreadable or not UTF-8: one line naming the file (and line)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise FakegptError(f"{path}:{line} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FakegptError(f"{path}: expected a mapping of config keys at the top level")
    return data


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a mapping, validating keys and types. `source` names the file for errors."""
    hints = _hints(cls)
    # T is a config dataclass, but a TypeVar cannot be bound to "any dataclass" (typeshed's protocol is private)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise FakegptError(f"{source}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})")
    values = {k: coerce(v, hints[k], f"{source}: key {k!r}") for k, v in data.items()}
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config, for logging and for writing back as YAML."""
    return dataclasses.asdict(cfg)


def add_fields(parser: argparse._ActionsContainer, cls: type) -> None:  # a parser or one of its argument groups
    """Add one flag (or positional) per dataclass field; defaults are SUPPRESSed so we see what was given."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if default not in (None, "", []):
            shown = default
            if isinstance(default, bool):
                shown = str(default).lower()
            elif isinstance(default, list):
                shown = ",".join(str(d) for d in default)
            help_text = f"{help_text} (default: {str(shown).replace('%', '%%')})".strip()
        is_list = typing.get_origin(tp) is list
        if f.metadata.get("positional"):
            parser.add_argument(
                f.name,
                nargs="*" if is_list else "?",
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.name.upper().rstrip("S") if is_list else f.name.upper(),
            )
            # The same as a flag, for `mlflow run -P inputs=...` (MLflow passes parameters as --name value).
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                nargs="+" if is_list else None,
                default=argparse.SUPPRESS,
                help=f"the same as the positional {f.name.upper()}",
            )
            continue
        metavar = "true|false" if tp is bool else None
        # A bare boolean flag (`--force`) means true; `--force false` still works.
        extra = {"nargs": "?", "const": "true"} if tp is bool else {"nargs": "+" if is_list else None}
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=help_text,
            metavar=metavar,
            **extra,
        )


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with `--config FILE.yaml` and one flag per field of dataclass `cls`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE.yaml", help="load these fields from a YAML file; flags override it")
    add_experiment_flag(parser)
    add_fields(parser, cls)
    return parser


def add_experiment_flag(parser: argparse.ArgumentParser) -> None:
    """`--experiment NAME`: the MLflow experiment of the runs this stage starts (MLFLOW_EXPERIMENT_NAME)."""
    parser.add_argument(
        "--experiment",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="MLflow experiment for new runs (default: $MLFLOW_EXPERIMENT_NAME, else fakegpt)",
    )


def apply_experiment_flag(ns: dict[str, Any]) -> None:
    """Pop `--experiment` from parsed flags and make it the experiment of every run this process starts."""
    name = ns.pop("experiment", None)
    if name is not None:
        if not str(name).strip():
            raise FakegptError("--experiment: must not be empty")
        os.environ["MLFLOW_EXPERIMENT_NAME"] = str(name).strip()
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


class ErrorRaisingParser(argparse.ArgumentParser):
    """argparse that raises FakegptError (one line, exit 2 in the CLI) instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit 2 itself
        """Raise the message argparse would print (with usage) as a FakegptError instead."""
        raise FakegptError(message)


def parse(cls: type[T], argv: list[str] | None, prog: str, description: str = "") -> T:
    """Parse `argv` into `cls`: defaults < `--config` YAML < flags."""
    return parse_given(cls, argv, prog, description)[0]


def parse_given(cls: type[T], argv: list[str] | None, prog: str, description: str = "") -> tuple[T, frozenset[str]]:
    """`parse`, plus the field names the user gave (as flags or in the `--config` YAML), whatever their value.

    A stage that continues earlier work (`finetune --init-from resume`) needs to tell "not given" from "given
    with the default value". Under `mlflow run` only the -P parameters given reach the stage as flags.
    """
    parser = build_parser(cls, prog, description)
    parser.__class__ = ErrorRaisingParser
    ns = vars(parser.parse_args(normalise_flags(argv)))
    apply_experiment_flag(ns)
    config_path = ns.pop("config", None)
    merged: dict[str, Any] = load_yaml(config_path) if config_path else {}
    source = str(config_path) if config_path else "config"
    from_file = from_dict(cls, merged, source)  # validates the file on its own, naming it in errors
    hints = _hints(cls)
    overrides = {k: coerce(v, hints[k], flag_name(k)) for k, v in ns.items()}
    given = set(merged) | set(overrides)  # under `mlflow run` only the -P parameters given are passed as flags
    # as in from_dict: T is a config dataclass, which the TypeVar cannot say
    return dataclasses.replace(from_file, **overrides), frozenset(given)  # type: ignore[type-var]


def non_default_keys(cfg: Any) -> frozenset[str]:
    """Fields of a config dataclass whose value differs from the class default: what a caller that built the
    dataclass in code (not from flags) evidently chose. The fallback of `parse_given` for library calls."""
    defaults = type(cfg)()
    return frozenset(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name))
