"""A fine-tuned model's folder and its `training_info.json`: the hand-off from `finetune` to the measuring stages.

`finetune` writes OUT/checkpoint/ (HF format: safetensors, config, bundled tokenizer) with `TrainingInfo`
inside it; `sample`, `score`, `chat`, the studies and `--init-from resume` read it back through
`TrainingInfo.load`. The dose of a model in a mixture series is read from here (its data's realised mixture).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fakegpt.contracts import from_versioned_dict, to_versioned_dict
from fakegpt.data.meta import DatasetMeta
from fakegpt.files import read_json_object

CHECKPOINT_DIR = "checkpoint"  # OUT/checkpoint/: the best model, HF format + training_info.json
ADAPTER_DIR = "adapter"  # OUT/adapter/: with --method lora, the best model's adapters (peft format)
INFO_FILE = "training_info.json"
# Files a checkpoint folder holds (weights, config, generation defaults, bundled tokenizer, training info).
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    INFO_FILE,
)
SCHEMA_VERSION = 1


@dataclass
class TrainingInfo:
    """How a checkpoint was made: the base model, the resolved fine-tune config, its data, where it stopped."""

    SCHEMA: ClassVar[int] = SCHEMA_VERSION
    NUMBERS: ClassVar[tuple[str, ...]] = ("iter", "val_loss", "tokens_seen")

    init_from: str  # the base model (hub name or folder), also for a resumed run
    config: dict[str, Any]  # finetune's resolved configuration (device, dtype, compile as used)
    data: dict[str, Any]  # the data folder's meta.json (DatasetMeta.to_dict())
    iter: int  # the iteration whose weights these are
    val_loss: float
    tokens_seen: int
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> DatasetMeta | None:
        """The data's meta.json as its contract (None for a checkpoint trained without one)."""
        return DatasetMeta.from_dict(self.data, f"{INFO_FILE}: data") if self.data else None

    def fraction(self, source: str = "antivax") -> float | None:
        """The realised share of `source` in this model's fine-tuning mixture, if the data had one."""
        value = (self.data.get("mixture") or {}).get(source)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as training_info.json."""
        return to_versioned_dict(self)

    def write(self, folder: str | Path) -> Path:
        """Write FOLDER/training_info.json (inside a checkpoint folder still being assembled)."""
        path = Path(folder) / INFO_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> TrainingInfo | None:
        """FOLDER/training_info.json, or None for a model folder without one (a hub model, a plain HF folder)."""
        path = Path(folder) / INFO_FILE
        data = read_json_object(path)
        return from_versioned_dict(cls, data, str(path)) if data else None
