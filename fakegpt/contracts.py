"""Reading the versioned JSON hand-offs between stages (dataset meta.json, a checkpoint's training_info.json).

Each contract is a dataclass with a `SCHEMA` version and the names of its integer fields (`NUMBERS`). A file
without `schema_version` is version 1 (what fakegpt wrote before the key existed); a newer version, a missing
key or a non-numeric count is a one-line error naming the file. Keys this version does not know are kept in
`extra`, so reading and rewriting a file from a newer minor version loses nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from fakegpt.errors import FakegptError

T = TypeVar("T")


def from_versioned_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build contract `cls` from a parsed JSON object; `where` names the file in errors."""
    # A contract is a dataclass with the class attributes SCHEMA and NUMBERS (TrainingInfo, DatasetMeta); no
    # protocol says "a dataclass with these", so the checks below are on an Any view of the class.
    contract: Any = cls
    version = data.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version > contract.SCHEMA:
        raise FakegptError(
            f"{where}: schema_version {version!r} is not one this fakegpt reads (up to "
            f"{contract.SCHEMA}); it was written by a newer fakegpt: upgrade, or recreate the file"
        )
    fields = {f.name: f for f in dataclasses.fields(contract)}
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise FakegptError(f"{where}: missing key {missing[0]!r}; the file is incomplete or not fakegpt's")
    for name in contract.NUMBERS:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FakegptError(f"{where}: key {name!r} must be a number, got {value!r}")
    values = {k: v for k, v in data.items() if k in fields and k != "extra"}
    values["schema_version"] = version
    return contract(**values, extra={k: v for k, v in data.items() if k not in fields})


def to_versioned_dict(obj: Any) -> dict[str, Any]:
    """The contract as the JSON object it is written as (`extra` keys back at the top level)."""
    data = dataclasses.asdict(obj)
    data.update(data.pop("extra", {}))
    return data
