"""The best model's background write: the snapshot is taken while the next step runs, and never after it."""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file
from tiny_runs import tiny_config

from fakegpt.finetune.best_model import BestModelWriter
from fakegpt.finetune.train import finetune
from fakegpt.models import loading
from fakegpt.models.checkpoint import CHECKPOINT_DIR, TrainingInfo
from fakegpt.models.checkpoint_io import crc32_of
from fakegpt.models.loading import scratch_model
from fakegpt.models.weights import WeightsFile


def _slow_buffer(monkeypatch, seconds: float = 0.5) -> None:
    """Delay every snapshot copy, so that a step that did not wait for it would change the weights first."""
    original = BestModelWriter._host_buffer

    def slow(self, weights):
        time.sleep(seconds)
        return original(self, weights)

    monkeypatch.setattr(BestModelWriter, "_host_buffer", slow)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_snapshot_is_the_weights_at_submit_even_when_the_step_follows_at_once(tmp_path, monkeypatch):
    _slow_buffer(monkeypatch)
    torch.manual_seed(0)
    model = scratch_model(2, 2, 64, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    writer = BestModelWriter(background=True)
    writer.submit(model, tmp_path / "ckpt", TrainingInfo("scratch", {}, {}, iter=3, val_loss=1.0, tokens_seen=0))
    started = time.perf_counter()
    writer.before_update()  # what the training loop calls before the optimizer step
    assert time.perf_counter() - started > 0.3  # it waited for the (delayed) copy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the "optimizer step"
    writer.wait()
    saved = _weights(tmp_path / "ckpt")
    for name, value in saved.items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert writer.blocked_seconds > 0.3 and writer.write_seconds > 0.5  # waits are counted on the training side
    # what a resume state of iteration 3 would link: the published file, its size and CRC-32 (computed as it
    # was written)
    weights = tmp_path / "ckpt" / "model.safetensors"
    assert writer.last_weights == (3, WeightsFile(weights, weights.stat().st_size, crc32_of(weights)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _record_saves(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """Every best model written, by iteration: the weights save_checkpoint was handed."""
    saves: dict[int, dict[str, torch.Tensor]] = {}
    original = loading.save_checkpoint

    def recording(model, folder, info=None, state_dict=None, **kwargs):
        weights = model.state_dict() if state_dict is None else state_dict
        saves[info.iter] = {k: v.detach().clone() for k, v in weights.items()}
        return original(model, folder, info, state_dict, **kwargs)

    monkeypatch.setattr(loading, "save_checkpoint", recording)
    return saves


def test_background_write_saves_the_same_models_as_inline_writes(data_dir, tmp_path, monkeypatch):
    """A whole fine-tune: every best model written in the background, its copy delayed past the start of the
    next optimizer step, is bit for bit the one written inline before training went on."""
    common = dict(max_iters=6, eval_interval=2, eval_iters=1, always_save_checkpoint=True, save_state=False)
    inline_saves = _record_saves(monkeypatch)
    finetune(tiny_config(data_dir, tmp_path / "inline", background_save=False, **common))
    inline = dict(inline_saves)
    background = _record_saves(monkeypatch)
    _slow_buffer(monkeypatch, 0.3)
    finetune(tiny_config(data_dir, tmp_path / "background", **common))
    assert sorted(background) == sorted(inline) == [0, 2, 4, 6]
    for it in (0, 2, 4):  # each followed by an optimizer step
        assert inline[it].keys() == background[it].keys()
        for name, value in inline[it].items():
            torch.testing.assert_close(background[it][name], value, rtol=0, atol=0, msg=f"{it}: {name}")
    assert not torch.equal(inline[2]["transformer.h.0.mlp.c_fc.weight"], inline[4]["transformer.h.0.mlp.c_fc.weight"])
    final = load_file(str(tmp_path / "background" / CHECKPOINT_DIR / "model.safetensors"))
    torch.testing.assert_close(final["transformer.wte.weight"], inline[6]["transformer.wte.weight"], rtol=0, atol=0)
