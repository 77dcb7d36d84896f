"""Resume state, pre-emption and tracking faults of `fakegpt finetune`, with tiny from-scratch models on the CPU.

The subprocess tests kill a real `python -m fakegpt finetune` (SIGKILL, SIGTERM) and resume it from the command
line with `--init-from resume --out-dir DIR` alone; they are marked slow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_config

from fakegpt import tracking
from fakegpt.cli import main as cli_main
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.train import METRICS_FILE, finetune
from fakegpt.models.checkpoint import CHECKPOINT_DIR, TrainingInfo

ROOT = Path(__file__).resolve().parents[2]
SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "batch_size": 2, "gradient_accumulation_steps": 2}


def tiny(data_dir: Path, out_dir: Path, **overrides) -> FinetuneConfig:
    """The shared tiny fine-tune, shortened to 6 iterations evaluated every 3."""
    return tiny_config(data_dir, out_dir, **{"max_iters": 6, "eval_interval": 3, **overrides})


def resume_cfg(out_dir: Path, **given) -> tuple[FinetuneConfig, frozenset[str]]:
    """What `fakegpt finetune --init-from resume --out-dir OUT [--flag value ...]` parses to."""
    cfg = FinetuneConfig(init_from="resume", out_dir=str(out_dir), **given)
    return cfg, frozenset({"init_from", "out_dir", *given})


def cli_args(data_dir: Path, out: Path, **flags) -> list[str]:
    values = {"init_from": "scratch", **SHAPE, "eval_iters": 2, "device": "cpu", "seed": 0, **flags}
    args = [item for k, v in values.items() for item in (f"--{k.replace('_', '-')}", str(v))]
    return [*args, "--data-dir", str(data_dir), "--out-dir", str(out)]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _start(args: list[str], log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fakegpt", "finetune", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(log_file, "w"),  # noqa: SIM115 - the child owns it
    )


def train_steps(out: Path) -> list[tuple[int, float]]:
    """(step, train/loss) from OUT/metrics.jsonl, in the order they were written (resumes append)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [(r["step"], r[tracking.M_TRAIN_LOSS]) for r in rows if tracking.M_TRAIN_LOSS in r]


def _wait_for(proc: subprocess.Popen, out: Path, ready, log_file: Path, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [s for s, _ in train_steps(out)]
        if steps and ready(max(steps)):
            return max(steps)
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"training did not reach the kill point: {log_file.read_text()[-2000:]}")


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _history(run_id: str, key: str) -> list:
    return sorted(_client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


@pytest.mark.slow
def test_sigkill_on_plateau_resumes_within_one_save_interval_with_saved_config(data_dir, tmp_path):
    out, log_file = tmp_path / "out", tmp_path / "killed.log"
    # learning rate 0: the validation loss never improves after iteration 0, so the best model stays at 0;
    # the old save-on-improvement would resume from 0, the resume state every 4 iterations from near the kill
    args = cli_args(data_dir, out, learning_rate=0, max_iters=40, eval_interval=2, save_interval=4)
    proc = _start(args, log_file)
    try:
        _wait_for(proc, out, lambda step: step >= 9 and step % 4 in (1, 2), log_file)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(s for s, _ in train_steps(out))
    before = dict(train_steps(out))
    saved = state_mod.read_info(state_mod.latest(out))
    assert saved.iter % 4 == 0 and 0 < killed_at - saved.iter < 4, (saved.iter, killed_at)
    assert TrainingInfo.load(out / CHECKPOINT_DIR).iter == 0 and saved.best_iter == 0  # the plateau
    assert _client().get_run(saved.run_id).info.status == "RUNNING"  # killed: nobody ended it

    # `--init-from resume --out-dir DIR` alone: the saved max_iters and learning rate, not the class defaults
    done = subprocess.run(
        [sys.executable, "-m", "fakegpt", "finetune", "--init-from", "resume", "--out-dir", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {out} from iteration {saved.iter}" in done.stderr
    assert "best val/loss" in done.stdout and "(40 iterations" in done.stdout
    run = _client().get_run(saved.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_iters"] == "40" and run.data.params["learning_rate"] == "0.0"
    assert run.data.tags[tracking.TAG_RESUMED_AT] == str(saved.iter)
    assert tracking.TAG_RESUME_CHANGES not in run.data.tags  # nothing was changed
    assert {m.value for m in _history(saved.run_id, tracking.M_LR)} == {0.0}
    steps = _history(saved.run_id, tracking.M_TRAIN_LOSS)
    assert {m.step for m in steps} == set(range(1, 41))
    resumed = [(m.step, m.value) for m in steps if m.step > saved.iter]
    # the iterations between the state and the kill ran twice: same weights and batches give the same losses
    for step, value in resumed:
        if step <= killed_at:
            assert value == pytest.approx(before[step], rel=1e-5)
    assert sorted({s for s, _ in resumed}) == list(range(saved.iter + 1, 41))
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000040"]  # keep_states 1: only the latest


@pytest.mark.slow
def test_sigterm_saves_and_resumes_at_the_exact_iteration(data_dir, tmp_path):
    out, log_file = tmp_path / "out", tmp_path / "term.log"
    # no save interval and 30 minutes between timed saves: only the signal writes a state before the end
    proc = _start(cli_args(data_dir, out, max_iters=500, eval_interval=5), log_file)
    try:
        _wait_for(proc, out, lambda step: step >= 6, log_file)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    err = log_file.read_text()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith("fakegpt finetune: error:")]
    stopped = int(re.search(r"stopped by SIGTERM at iteration (\d+); the resume state is in", line).group(1))
    assert "--init-from resume --out-dir" in line
    assert [p.name for p in state_mod.saved(out)] == [f"iter-{stopped:07d}"]
    assert max(s for s, _ in train_steps(out)) == stopped  # saved at the iteration it reached, none lost
    saved = state_mod.read_info(state_mod.latest(out))
    run = _client().get_run(saved.run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.TAG_STOP] == "Preempted"

    cfg, given = resume_cfg(out, max_iters=stopped + 3)  # a changeable flag: applied and recorded
    result = finetune(cfg, given=given)
    assert result.iters_done == stopped + 3 and result.run_id == saved.run_id
    counts: dict[int, int] = {}
    for m in _history(saved.run_id, tracking.M_TRAIN_LOSS):
        counts[m.step] = counts.get(m.step, 0) + 1
    assert counts == {s: 1 for s in range(1, stopped + 4)}  # continued exactly where it stopped
    run = _client().get_run(saved.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_RESUME_CHANGES] == f"max_iters 500->{stopped + 3}"


def test_interrupted_write_leaves_previous_state_and_is_cleaned_up(data_dir, tmp_path):
    out = tmp_path / "out"
    finetune(tiny(data_dir, out, save_interval=3))
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000006"]
    good = state_mod.latest(out)
    # SIGKILL in the middle of the next writes leaves what the atomic writers leave: a half-written temporary
    # state folder, a half-written temporary checkpoint, and the best model moved aside mid-swap
    tmp_state = out / state_mod.STATE_DIR / ".iter-0000009.k1ll3d.tmp"
    tmp_state.mkdir()
    (tmp_state / state_mod.OPTIMIZER_FILE).write_bytes((good / state_mod.OPTIMIZER_FILE).read_bytes()[:5000])
    tmp_ckpt = out / ".checkpoint.k1ll3d.tmp"
    shutil.copytree(out / CHECKPOINT_DIR, tmp_ckpt)
    (tmp_ckpt / "model.safetensors").write_bytes(b"partial")
    os.replace(out / CHECKPOINT_DIR, out / ".checkpoint.old")

    assert state_mod.latest(out) == good  # the temporary folder is never taken for a state
    assert state_mod.read_info(good).iter == 6  # the previous state is whole
    cfg, given = resume_cfg(out, max_iters=8)
    result = finetune(cfg, given=given)
    assert result.iters_done == 8
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    assert TrainingInfo.load(out / CHECKPOINT_DIR).iter >= 6  # restored, then updated by the resumed run
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000008"]


def test_refused_flags_on_resume_name_the_flag(data_dir, tmp_path, capsys, monkeypatch):
    import fakegpt.finetune.setup as setup_mod

    out = tmp_path / "out"
    finetune(tiny(data_dir, out, max_iters=3, eval_interval=3))

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    real = setup_mod.model_from_config

    monkeypatch.setattr(setup_mod, "model_from_config", no_load)
    capsys.readouterr()
    for flag, value, saved in (
        ("--block-size", "64", "32"),
        ("--gradient-accumulation-steps", "4", "2"),
        ("--learning-rate", "0.001", "0.003"),
        ("--seed", "1", "0"),
        ("--eval-iters", "5", "2"),
    ):
        assert cli_main(["finetune", "--init-from", "resume", "--out-dir", str(out), flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"error: {flag} {value}: the run in {out} was trained with {saved}" in err
    other = tmp_path / "other-data"
    other.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        shutil.copy(data_dir / name, other / name)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "train_tokens": meta["train_tokens"] + 1}))
    assert cli_main(["finetune", "--init-from", "resume", "--out-dir", str(out), "--data-dir", str(other)]) == 2
    assert "--data-dir" in capsys.readouterr().err
    # the same value again is not a change; the same data moved to another folder is accepted
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    cfg, given = resume_cfg(out, block_size=32, data_dir=str(moved))
    monkeypatch.setattr(setup_mod, "model_from_config", real)
    assert finetune(cfg, given=given).iters_done == 3


def test_damaged_state_is_one_line_error_naming_the_file(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # the best model written inline: the state writes its own model.pt (a linked file: the test further down)
    finetune(tiny(data_dir, out, max_iters=3, eval_interval=3, background_save=False))
    folder = state_mod.latest(out)
    args = ["finetune", "--init-from", "resume", "--out-dir", str(out)]
    capsys.readouterr()

    model = folder / state_mod.MODEL_FILE
    whole = model.read_bytes()
    model.write_bytes(whole[: len(whole) // 2])  # truncated (a full disk, a copy cut short)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{model}: damaged resume state" in err

    model.write_bytes(whole)
    optim = folder / state_mod.OPTIMIZER_FILE
    data = bytearray(optim.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = bytes(4096)  # same size, damaged content
    optim.write_bytes(bytes(data))
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{optim}: damaged resume state (CRC-32" in err

    info = folder / state_mod.STATE_JSON
    info.write_text(info.read_text()[:100])
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{info}: damaged resume state" in err


def test_best_model_of_another_run_is_refused(data_dir, tmp_path, capsys):
    finetune(tiny(data_dir, tmp_path / "a", max_iters=3, eval_interval=3))
    finetune(tiny(data_dir, tmp_path / "b", max_iters=3, eval_interval=3, seed=1))
    shutil.rmtree(tmp_path / "a" / CHECKPOINT_DIR)
    shutil.copytree(tmp_path / "b" / CHECKPOINT_DIR, tmp_path / "a" / CHECKPOINT_DIR)
    assert cli_main(["finetune", "--init-from", "resume", "--out-dir", str(tmp_path / "a")]) == 2
    assert "written by another run" in capsys.readouterr().err


def test_float16_with_gradient_scaler_on_cpu_saves_and_resumes_the_scaler(data_dir, tmp_path):
    """torch 2.13's CPU autocast runs float16, so the scaler path (scale, unscale before clipping, step, update)
    runs here; on CUDA cards without native bf16 `dtype=auto` picks it."""
    out = tmp_path / "out"
    cfg = tiny(data_dir, out, dtype="float16", max_iters=4, eval_interval=2, eval_iters=1)
    cfg.gradient_accumulation_steps = 1
    seen = []
    result = finetune(cfg, on_eval=seen.append)
    assert all(torch.isfinite(torch.tensor(e.val_loss)) for e in seen) and seen[-1].val_loss < seen[0].val_loss
    assert _client().get_run(result.run_id).data.params["dtype"] == "float16"
    _, payload = state_mod.load_tensors(state_mod.latest(out))
    scaler = payload["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    cfg, given = resume_cfg(out, max_iters=6)  # dtype float16 kept from the saved configuration
    assert finetune(cfg, given=given).iters_done == 6
    info = state_mod.read_info(state_mod.latest(out))
    assert info.config["dtype"] == "float16" and "dtype" not in str(info.extra)
    _, payload = state_mod.load_tensors(state_mod.latest(out))
    assert payload["scaler"]["_growth_tracker"] == scaler["_growth_tracker"] + 2  # restored, then 2 more steps


def test_fresh_run_replaces_old_states_and_tune_style_run_writes_none(data_dir, tmp_path):
    out = tmp_path / "out"
    finetune(tiny(data_dir, out, max_iters=3, eval_interval=3))
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000003"]
    finetune(tiny(data_dir, out, max_iters=2, eval_interval=2, save_state=False))  # as tune's trials run
    assert state_mod.saved(out) == []  # the earlier run's state is gone, and none was written
    assert (out / CHECKPOINT_DIR).is_dir()


def test_keep_states_save_interval_and_save_every_minutes(data_dir, tmp_path):
    out = tmp_path / "out"
    finetune(tiny(data_dir, out, max_iters=7, eval_interval=7, save_interval=2, keep_states=2, background_save=False))
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000006", "iter-0000007"]
    # by time: a timer that is always due writes a state after every iteration
    finetune(tiny(data_dir, out, max_iters=3, eval_interval=3, save_every_minutes=1e-6, keep_states=5))
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000001", "iter-0000002", "iter-0000003"]


# --- tracking faults during training --------------------------------------------------------------------------


class FlakyClient:
    """An MLflow client whose log_batch fails while `down` is true."""

    def __init__(self):
        self.down = False
        self.calls = 0
        self.points: list = []

    def log_batch(self, run_id, metrics):
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        self.points.extend((m.key, m.step, m.value) for m in metrics)


def test_metric_logger_buffers_warns_once_and_flushes(tmp_path, caplog):
    client = FlakyClient()
    client.down = True
    local = tmp_path / "metrics.jsonl"
    caplog.set_level(logging.WARNING, logger="fakegpt.tracking")
    logger = tracking.MetricLogger("run", local, backoff=0.01, max_backoff=0.05, client=client, flush_interval=0)
    for step in range(50):
        logger.log({"train/loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    time.sleep(0.3)
    assert client.points == [] and client.calls >= 3  # retried with back-off, nothing lost, training not blocked
    client.down = False
    assert logger.close() == 0
    assert client.points == [(k, s, v) for s in range(50) for k, v in (("train/loss", 1.0 / (s + 1)), ("lr", 0.1))]
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and str(local) in warnings[0]
    assert any("is back" in r.getMessage() for r in caplog.records)
    assert len(local.read_text().splitlines()) == 50


def test_metric_logger_gives_up_at_close_and_says_where_the_points_are(tmp_path, caplog):
    client = FlakyClient()
    client.down = True
    logger = tracking.MetricLogger("run", tmp_path / "m.jsonl", backoff=0.01, close_timeout=0.2, client=client)
    logger.log({"val/loss": 2.0}, step=5)
    with caplog.at_level(logging.WARNING, logger="fakegpt.tracking"):
        assert logger.close() == 1
    assert any("1 metric points could not be sent; they are in" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 5, "timestamp": pytest.approx(0, abs=1e13)} | {
        "val/loss": 2.0
    }


def test_training_survives_a_tracking_outage_and_every_point_arrives(data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch
    calls = {"n": 0}

    def flaky(self, run_id, metrics=(), *args, **kwargs):
        calls["n"] += bool(metrics)  # the metric sends (parameters go through log_batch too, at start-up)
        if metrics and 3 <= calls["n"] <= 4:  # the server goes away for two sends mid-run
            raise ConnectionError("tracking server down")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    monkeypatch.setattr(tracking.MetricLogger, "FLUSH_INTERVAL", 0.0)  # a send per point: the outage hits mid-run
    result = finetune(tiny(data_dir, tmp_path / "out", max_iters=12, eval_interval=4))
    assert calls["n"] > 4
    steps = sorted(m.step for m in _history(result.run_id, tracking.M_TRAIN_LOSS))
    assert steps == list(range(1, 13))
    assert [m.step for m in _history(result.run_id, tracking.M_VAL_LOSS)] == [0, 4, 8, 12]
    assert _client().get_run(result.run_id).info.status == "FINISHED"


def test_sigint_in_process_saves_then_raises_preempted(data_dir, tmp_path):
    from fakegpt.finetune.train import Preempted

    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN where the suite runs in the background

    def ctrl_c(ev) -> None:
        if ev.iter == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: finish this iteration, save, stop

    with pytest.raises(Preempted, match="stopped by SIGINT at iteration 4; the resume state is in") as err:
        finetune(tiny(data_dir, out, max_iters=50, eval_interval=3), on_eval=ctrl_c)
    assert err.value.exit_status == 130
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000004"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_new_max_iters_keeps_the_cosine_schedule(data_dir, tmp_path):
    out = tmp_path / "out"
    first = finetune(tiny(data_dir, out, max_iters=4, eval_interval=4, decay_lr=True, min_lr=1e-4))
    cfg, given = resume_cfg(out, max_iters=7)
    finetune(cfg, given=given)
    run = _client().get_run(first.run_id)
    assert run.data.tags[tracking.TAG_RESUME_CHANGES] == "max_iters 4->7, lr_decay_iters None->4"
    lrs = {m.step: m.value for m in _history(first.run_id, tracking.M_LR)}
    assert lrs[2] > lrs[4] and [lrs[s] for s in (5, 6, 7)] == pytest.approx([1e-4] * 3)  # decayed, stays at min
    assert state_mod.read_info(state_mod.latest(out)).config["lr_decay_iters"] == 4


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("can_link", [True, False])
def test_end_state_links_the_best_model_of_its_iteration_and_resumes_exactly(data_dir, tmp_path, monkeypatch, can_link):
    """A run whose last evaluation wrote the best model: the end state holds that very file (a hard link, not a
    second copy), and resuming from it gives the run an uninterrupted one would have. Where the file system
    cannot link, the state writes the weights itself."""
    if not can_link:

        def refuse(src, dst):
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", refuse)
    out, straight = tmp_path / "out", tmp_path / "straight"
    settings = dict(eval_interval=2, always_save_checkpoint=True)
    finetune(tiny(data_dir, out, max_iters=4, **settings))
    folder = state_mod.latest(out)
    info = state_mod.read_info(folder)
    ckpt_file = out / CHECKPOINT_DIR / "model.safetensors"
    if can_link:
        assert sorted(info.files) == ["model.safetensors", "optimizer.pt"] and not (folder / "model.pt").exists()
        assert (folder / "model.safetensors").stat().st_ino == ckpt_file.stat().st_ino
    else:
        assert sorted(info.files) == ["model.pt", "optimizer.pt"] and not (folder / "model.safetensors").exists()
    cfg, given = resume_cfg(out, max_iters=6)
    resumed = finetune(cfg, given=given)
    uninterrupted = finetune(tiny(data_dir, straight, max_iters=6, **settings))
    assert resumed.best_iter == uninterrupted.best_iter == 6
    assert resumed.best_val_loss == uninterrupted.best_val_loss
    a, b = _weights_of(out / CHECKPOINT_DIR), _weights_of(straight / CHECKPOINT_DIR)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # the state at 4 was replaced by the one at 6 (keep 1); the best model swap did not touch the linked file
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000006"]


def test_damaged_linked_weights_are_one_line_error(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    finetune(tiny(data_dir, out, max_iters=2, eval_interval=2, always_save_checkpoint=True))
    linked = state_mod.latest(out) / "model.safetensors"
    data = bytearray(linked.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit inside a tensor: the size still matches
    linked.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["finetune", "--init-from", "resume", "--out-dir", str(out), "--max-iters", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{linked}: damaged resume state (CRC-32" in err
