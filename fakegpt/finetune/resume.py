"""`--init-from resume --out-dir DIR`: continue a run with the configuration it saved, not with class defaults.

The saved (resolved) configuration is the base. A flag (or YAML key) given on resume is
- refused when it would change what the run means, naming the flag: the model shape, the context, the batch
  and accumulation (tokens per step), the data, the seed (batches), dropout, the fine-tune method and its LoRA
  settings (`--method`, `--lora-*`: the state holds adapters of that shape), the optimizer and learning-rate
  schedule (the curve would mix two experiments under one set of logged parameters), and `eval_iters` (it
  changes the validation windows, so new losses would not compare with the best so far);
- applied when it changes only how long the run goes or how it is watched and saved (`CHANGEABLE`); what changed
  is recorded as the MLflow tag `fakegpt.resume_changes`;
- taken from this invocation for the machine-dependent fields (`SYSTEM`: device, compile, parallel), so a run can
  continue on another machine; unset means `auto` again. dtype and gradient checkpointing are kept unless given
  (then applied and recorded: they change numerics or memory, not the experiment).
With a cosine schedule whose end defaulted to max_iters, a new `--max-iters` keeps the schedule: lr_decay_iters is
pinned to the saved max_iters.
A data folder given again may have moved: it is accepted when its meta.json is the saved one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakegpt import config as config_mod
from fakegpt.data.meta import DatasetMeta
from fakegpt.errors import FakegptError
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import FinetuneConfig

CHANGEABLE = (
    "max_iters",
    "eval_interval",
    "log_interval",
    "always_save_checkpoint",
    "save_state",
    "save_interval",
    "save_every_minutes",
    "keep_states",
    "background_save",
    "dtype",
    "gradient_checkpointing",
    "eval_sources",
    "register_as",
    "register_alias",
    "claims",
    "claim_eval_interval",
)
SYSTEM = ("device", "compile", "parallel", "nproc_per_node")  # parallel: the state is saved whole, either way reads it
NOT_COMPARED = ("init_from", "out_dir", "plan")


@dataclass
class Resumed:
    """What a resumed run continues with: the configuration, the state folder, its info and what changed."""

    cfg: FinetuneConfig  # the configuration to continue with
    folder: Path  # the state folder it continues from
    info: state_mod.ResumeInfo
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (saved, now)


def resolve(cfg: FinetuneConfig, given: frozenset[str]) -> Resumed:
    """The configuration of a resumed run: the saved one, with the changeable flags in `given` applied.

    Reads only state.json (no tensors), so a refused flag is reported before any model loads.
    """
    folder = state_mod.latest(cfg.out_dir)
    if folder is None:
        raise FakegptError(
            f"--init-from resume: no resume state in {Path(cfg.out_dir) / state_mod.STATE_DIR} "
            "(a run writes one every --save-interval iterations / --save-every-minutes, at its end and on SIGTERM)"
        )
    info = state_mod.read_info(folder)
    saved = config_mod.from_dict(FinetuneConfig, info.config, str(folder / state_mod.STATE_JSON) + ": config")
    values: dict[str, Any] = {}
    changes: dict[str, tuple[Any, Any]] = {}
    for name in sorted(given - set(NOT_COMPARED)):
        now, before = getattr(cfg, name), getattr(saved, name)
        if name in SYSTEM:
            continue
        if now == before:
            continue
        if name == "data_dir" and _same_data(now, info.data):
            values[name] = now
            changes[name] = (before, now)
            continue
        if name not in CHANGEABLE:
            raise FakegptError(
                f"{config_mod.flag_name(name)} {now}: the run in {cfg.out_dir} was trained with {before}; "
                f"changing it on resume would change what the run means (leave the flag out to continue "
                f"with {before}, or start a new run in another --out-dir)"
            )
        values[name] = now
        changes[name] = (before, now)
    if "max_iters" in values and saved.decay_lr and saved.lr_decay_iters is None:
        values["lr_decay_iters"] = saved.max_iters  # the cosine keeps ending where it was planned to
        changes["lr_decay_iters"] = (None, saved.max_iters)
    for name in SYSTEM:  # re-resolved on this machine (auto unless given now)
        values[name] = getattr(cfg, name)
    values.update(init_from="resume", out_dir=cfg.out_dir)
    return Resumed(dataclasses.replace(saved, **values), folder, info, changes)


def _same_data(data_dir: str, saved_meta: dict[str, Any]) -> bool:
    try:
        return DatasetMeta.load(Path(data_dir)).to_dict() == saved_meta
    except FakegptError:
        return False


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """`max_iters 30->60, eval_interval 5->10`, the MLflow tag's value."""
    return ", ".join(f"{k} {before}->{now}" for k, (before, now) in changes.items())
