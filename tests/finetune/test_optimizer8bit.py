"""`--optimizer adamw8bit`: bitsandbytes' 8-bit AdamW trains, its states are uint8, and resume restores them.
Tiny from-scratch models on real data (../shared/data), CPU only (bitsandbytes' CPU backend)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_config

from fakegpt.errors import FakegptError
from fakegpt.finetune import optim
from fakegpt.finetune import setup as setup_mod
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.train import finetune

pytest.importorskip("bitsandbytes")


def tiny(data_dir: Path, out_dir: Path, **overrides) -> FinetuneConfig:
    return tiny_config(data_dir, out_dir, **{"max_iters": 20, "optimizer": "adamw8bit", **overrides})


def _states(optimizer_state: dict) -> list[dict]:
    """Per parameter, bitsandbytes' state (its state_dict nests it under one key)."""
    return [s.get("__bnb_optimizer_quant_state__", s) for s in optimizer_state["state"].values()]


def _moments(optimizer_state: dict) -> list[torch.Tensor]:
    return [s[k] for s in _states(optimizer_state) for k in ("state1", "state2")]


def test_8bit_run_trains_and_its_states_are_uint8(data_dir, tmp_path):
    result = finetune(tiny(data_dir, tmp_path / "run"))
    first_val = result.val_curve[0][1]
    assert result.best_val_loss < first_val - 0.5, result.val_curve  # from ~10.8 (random init) down
    _, payload = state_mod.load_tensors(state_mod.latest(tmp_path / "run"))
    moments = _moments(payload["optimizer"])
    big = [m for m in moments if m.numel() >= optim.MIN_8BIT_SIZE]
    small = [m for m in moments if m.numel() < optim.MIN_8BIT_SIZE]
    assert big and all(m.dtype == torch.uint8 for m in big)  # matrices: 1 byte per element per moment
    assert small and all(m.dtype == torch.float32 for m in small)  # biases and LayerNorm gains: fp32
    absmax = [s["absmax1"] for s in _states(payload["optimizer"]) if "absmax1" in s]
    assert {a.dtype for a in absmax} == {torch.float32} and len(absmax) == len(big) // 2


def test_resume_restores_the_8bit_state_and_continues_exactly(data_dir, tmp_path, monkeypatch):
    straight = finetune(tiny(data_dir, tmp_path / "straight"))
    finetune(tiny(data_dir, tmp_path / "split", max_iters=10))
    _, saved = state_mod.load_tensors(state_mod.latest(tmp_path / "split"))
    restored: list[dict] = []
    real_restore = setup_mod.restore

    def spy(s, progress):
        real_restore(s, progress)
        restored.append(copy.deepcopy(s.optimizer.state_dict()))  # before training changes it in place

    monkeypatch.setattr(setup_mod, "restore", spy)
    cfg = FinetuneConfig(out_dir=str(tmp_path / "split"), init_from="resume", max_iters=20)
    resumed = finetune(cfg, given=frozenset({"out_dir", "init_from", "max_iters"}))
    # the optimizer the resumed run stepped from holds exactly the saved 8-bit codes and scales
    for before, after in zip(_moments(saved["optimizer"]), _moments(restored[0]), strict=True):
        assert before.dtype == after.dtype and torch.equal(before, after)
    assert resumed.iters_done == 20
    assert resumed.val_curve[-1][1] == pytest.approx(straight.val_curve[-1][1], abs=1e-5)


def test_adamw8bit_without_bitsandbytes_is_one_line_error(data_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(FakegptError, match=r"pip install 'fakegpt\[lowmem\]'") as info:
        finetune(tiny(data_dir, tmp_path / "run"))
    assert "\n" not in str(info.value)
