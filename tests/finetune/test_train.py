"""`fakegpt finetune` on real data (../shared/data) with tiny from-scratch models, CPU only, seconds each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TORCHRUN_2
from tiny_runs import tiny_config as tiny

from fakegpt import tracking
from fakegpt.data.bins import eval_starts
from fakegpt.errors import FakegptError
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.batches import Batches
from fakegpt.finetune.checks import check
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.record import CURVE_FILE
from fakegpt.finetune.train import EvalResult, NonFiniteLossError, finetune, lr_at
from fakegpt.models.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILES, INFO_FILE

ROOT = Path(__file__).resolve().parents[2]


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _val_loss(folder: Path, data_dir: Path, cfg: FinetuneConfig) -> float:
    """Validation loss of a saved checkpoint on finetune's fixed windows, computed independently."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    data = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r")
    starts = eval_starts(len(data), cfg.block_size, cfg.eval_iters * cfg.batch_size)
    batches = Batches(data, cfg.batch_size, cfg.block_size, torch.device("cpu"), seed=0)
    losses = []
    with torch.no_grad():
        for i in range(0, len(starts), cfg.batch_size):
            x, y = batches.windows(starts[i : i + cfg.batch_size])
            logits = model(input_ids=x).logits
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return float(torch.stack(losses).mean())


def test_val_loss_falls_checkpoint_and_mlflow_contents(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "out")
    seen: list[EvalResult] = []
    result = finetune(cfg, on_eval=seen.append, run_name="tiny", tags={"extra": "yes"})

    # evaluations at every eval_interval, iteration 0 included, and at the final (non-multiple) iteration
    assert [e.iter for e in seen] == [0, 10, 20, 25]
    assert [e.tokens_seen for e in seen] == [i * 2 * 32 * 2 for i in (0, 10, 20, 25)]
    assert seen[-1].val_loss < seen[0].val_loss - 1.0  # from ~ln(50257)=10.8 down on real Portuguese text
    assert seen[0].val_loss == pytest.approx(math.log(50257), abs=0.3)
    assert result.best_val_loss == min(e.val_loss for e in seen)
    assert result.iters_done == 25 and result.tokens_seen == 25 * 128
    assert result.val_curve == [(e.tokens_seen, e.val_loss) for e in seen]

    # the checkpoint folder holds exactly the expected files, reloads with transformers, and is the best model
    ckpt = tmp_path / "out" / CHECKPOINT_DIR
    assert result.checkpoint_dir == ckpt
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CHECKPOINT_FILES)
    info = json.loads((ckpt / INFO_FILE).read_text())
    assert info["iter"] == result.best_iter and info["init_from"] == "scratch"
    assert info["data"]["vocab_size"] == 50257 and info["data"]["train_tokens"] > 100_000  # prepare's meta.json
    assert info["config"]["learning_rate"] == 3e-3 and info["config"]["device"] == "cpu"
    assert info["tokens_seen"] == result.best_iter * 128
    assert _val_loss(ckpt, data_dir, cfg) == pytest.approx(result.best_val_loss, abs=1e-4)
    # the resume state: one folder, written at the end (no interval given), loadable with weights_only
    (folder,) = state_mod.saved(tmp_path / "out")
    assert folder.name == "iter-0000025"
    # the weights: the best model's own file, linked, when the last evaluation wrote it; else model.pt
    model_file = state_mod.LINKED_MODEL_FILE if result.best_iter == 25 else state_mod.MODEL_FILE
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [model_file, state_mod.OPTIMIZER_FILE, state_mod.STATE_JSON, state_mod.MODEL_CONFIG]
    )
    saved = state_mod.read_info(folder)
    assert (saved.iter, saved.best_iter, saved.run_id) == (25, result.best_iter, result.run_id)
    assert saved.config["learning_rate"] == 3e-3 and saved.config["save_interval"] == 0
    assert saved.run_uid == info[state_mod.RUN_UID_KEY]  # the best model and the state belong together
    weights, payload = state_mod.load_tensors(folder)
    assert set(payload) == {"optimizer", "scaler"} and "transformer.wte.weight" in weights
    assert [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()][:3] == [
        0,
        1,
        2,
    ]  # the local copy of every metric point

    # MLflow: status, tags, params (config + meta.json), metric histories, artifacts
    client = _client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    tags = run.data.tags
    assert tags[tracking.TAG_MODEL] == "scratch" and tags[tracking.TAG_STAGE] == "finetune"
    assert tags[tracking.TAG_DATASET] == info["data"].get("dataset", data_dir.name) and tags["extra"] == "yes"
    assert tags[tracking.TAG_MIX] == "fakewhatsapp_br=1.00"  # one source: its realised share
    params = run.data.params
    assert params["learning_rate"] == "0.003" and params["gradient_accumulation_steps"] == "2"
    assert params["dtype"] == "float32" and params["compile"] == "false"
    assert params["data.vocab_size"] == "50257"
    train_hist = client.get_metric_history(result.run_id, tracking.M_TRAIN_LOSS)
    assert sorted(m.step for m in train_hist) == list(range(1, 26))
    val_hist = sorted(client.get_metric_history(result.run_id, tracking.M_VAL_LOSS), key=lambda m: m.step)
    assert [m.step for m in val_hist] == [e.iter for e in seen]
    assert [m.value for m in val_hist] == pytest.approx([e.val_loss for e in seen])
    assert len(client.get_metric_history(result.run_id, tracking.M_TRAIN_TOKENS_PER_S)) == 25
    assert {m.value for m in client.get_metric_history(result.run_id, tracking.M_LR)} == {3e-3}
    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {CHECKPOINT_DIR, CURVE_FILE, "config.yaml"} <= top
    logged = {Path(a.path).name for a in client.list_artifacts(result.run_id, CHECKPOINT_DIR)}
    assert logged == set(CHECKPOINT_FILES)
    from mlflow.utils.file_utils import local_file_uri_to_path

    weights = Path(local_file_uri_to_path(run.info.artifact_uri)) / CHECKPOINT_DIR / "model.safetensors"
    ours = tmp_path / "out" / CHECKPOINT_DIR / "model.safetensors"
    assert weights.read_bytes() == ours.read_bytes()
    if weights.stat().st_dev == ours.stat().st_dev:  # one file system: linked, not copied
        assert weights.stat().st_ino == ours.stat().st_ino
    assert (tmp_path / "out" / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Enough(Exception):
    pass


def test_on_eval_stop_ends_run_killed_and_reraises(data_dir, tmp_path):
    # also exercises gradient checkpointing (recomputed activations give the same training path)
    cfg = tiny(data_dir, tmp_path / "out", max_iters=50, eval_interval=5, gradient_checkpointing=True)

    def stop(ev: EvalResult) -> None:
        if ev.iter == 5:
            raise Enough("pruned")

    with pytest.raises(Enough, match="pruned"):
        finetune(cfg, on_eval=stop)
    (run,) = _client().search_runs([_client().get_experiment_by_name("fakegpt").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.TAG_STOP] == "Enough"
    # the stop came after iteration 5's evaluation: its checkpoint is on disk
    assert json.loads((tmp_path / "out" / CHECKPOINT_DIR / INFO_FILE).read_text())["iter"] == 5


def test_nan_loss_stops_naming_iteration_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch):
    import fakegpt.finetune.step as step_mod

    real = step_mod.causal_lm_loss
    calls = {"train": 0}

    def poisoned(model, x, y, **options):
        loss = real(model, x, y, **options)
        if model.training:
            calls["train"] += 1
            if calls["train"] > 7 * 2:  # 2 micro-steps per iteration: iterations 0-6 are fine, 7 is not
                return loss * float("nan")
        return loss

    monkeypatch.setattr(step_mod, "causal_lm_loss", poisoned)
    cfg = tiny(data_dir, tmp_path / "out", max_iters=20, eval_interval=5)
    with pytest.raises(NonFiniteLossError, match="iteration 7") as err:
        finetune(cfg)
    assert "iteration 5" in str(err.value)  # names the checkpoint it kept
    assert json.loads((tmp_path / "out" / CHECKPOINT_DIR / INFO_FILE).read_text())["iter"] == 5
    (run,) = _client().search_runs([_client().get_experiment_by_name("fakegpt").experiment_id])
    assert run.info.status == "FAILED"
    assert "iteration 7" in run.data.tags[tracking.TAG_ERROR]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "nproc-per-node"])
def test_two_processes_torchrun_gloo(data_dir, tmp_path, launch):
    """Two gloo processes, started by torchrun or by `fakegpt finetune --nproc-per-node 2` itself (what `mlflow run`
    and a series' cells use): the same one run, one report, one checkpoint."""
    out = tmp_path / "out"
    start = [*TORCHRUN_2, "-m", "fakegpt"] if launch == "torchrun" else [sys.executable, "-m", "fakegpt"]
    cmd = [
        *start,
        "finetune",
        "--init-from",
        "scratch",
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "64",
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--gradient-accumulation-steps",
        "4",
        "--max-iters",
        "6",
        "--eval-interval",
        "3",
        "--eval-iters",
        "3",
        "--learning-rate",
        "3e-3",
        "--device",
        "cpu",
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out),
        *(["--nproc-per-node", "2"] if launch == "nproc-per-node" else []),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val/loss") == 1  # only rank 0 reports
    client = _client()
    (run,) = client.search_runs([client.get_experiment_by_name("fakegpt").experiment_id])  # logged once
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(run.info.run_id, tracking.M_TRAIN_LOSS)
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 6]
    val = sorted(client.get_metric_history(run.info.run_id, tracking.M_VAL_LOSS), key=lambda m: m.step)
    assert [m.step for m in val] == [0, 3, 6] and val[-1].value < val[0].value
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == sorted(CHECKPOINT_FILES)
    # tokens per iteration count the whole accumulation, split over both ranks
    assert json.loads((out / CHECKPOINT_DIR / INFO_FILE).read_text())["tokens_seen"] == 6 * 2 * 32 * 4
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000006"]  # rank 0 wrote the one resume state

    # both ranks resume from it with the saved configuration (only --max-iters changes) and continue the run
    resume = [*cmd[: cmd.index("--init-from")], "--init-from", "resume", "--out-dir", str(out), "--max-iters", "8"]
    proc = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"resuming {out} from iteration 6") == 1  # logged by rank 0 only
    hist = client.get_metric_history(run.info.run_id, tracking.M_TRAIN_LOSS)
    assert sorted(m.step for m in hist) == list(range(1, 9))
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000008"]


def _fake_hub_cache(cache: Path, name: str, model_dir: Path) -> None:
    """A Hugging Face cache holding `name` (as `snapshot_download` lays it out), made from a local folder."""
    import shutil

    repo = cache / f"models--{name}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


def test_hub_name_from_cache_local_folder_and_offline_failure(data_dir, tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.constants

    from fakegpt.cli import main as cli_main

    cache = tmp_path / "hf-cache"
    _fake_hub_cache(cache, "gpt2", tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    # a hub name found in the local cache: loads the pretrained (here tiny) weights, dropout overridden
    cfg = tiny(data_dir, tmp_path / "hub", init_from="gpt2", max_iters=2, eval_interval=2, block_size=64)
    result = finetune(cfg)
    saved = json.loads((tmp_path / "hub" / CHECKPOINT_DIR / "config.json").read_text())
    assert saved["n_embd"] == 64 and saved["n_positions"] == 256 and saved["resid_pdrop"] == 0.0
    assert _client().get_run(result.run_id).data.tags[tracking.TAG_MODEL] == "gpt2"

    # a local HF folder works the same way (and the CLI path with the shipped tiny YAML)
    code = cli_main(
        [
            "finetune",
            "--config",
            str(ROOT / "experiments/finetune/tiny.yaml"),
            "--init-from",
            str(tiny_model_dir),
            "--data-dir",
            str(data_dir),
            "--out-dir",
            str(tmp_path / "local"),
            "--max-iters",
            "2",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--block-size",
            "64",
        ]
    )
    assert code == 0
    info = json.loads((tmp_path / "local" / CHECKPOINT_DIR / INFO_FILE).read_text())
    assert info["init_from"] == str(tiny_model_dir) and info["iter"] == 2

    # a hub name that is not cached, offline: a clear error within seconds, before training starts
    started = time.monotonic()
    with pytest.raises(FakegptError, match="gpt2-xl.*not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        finetune(tiny(data_dir, tmp_path / "xl", init_from="gpt2-xl"))
    assert time.monotonic() - started < 20  # transformers alone would retry each file for ~23 s
    assert not (tmp_path / "xl").exists()


def test_bad_arguments_reported_before_model_load(data_dir, tmp_path, tiny_model_dir, monkeypatch, capsys):
    import fakegpt.finetune.setup as setup_mod
    from fakegpt.cli import main as cli_main

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(setup_mod, "load_model", no_load)
    monkeypatch.setattr(setup_mod, "scratch_model", no_load)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FakegptError, match=r"empty/train\.bin: no such file.*fakegpt prepare"):
        finetune(tiny(empty, tmp_path / "o"))
    with pytest.raises(FakegptError, match="block-size 512 is larger than the model's context \\(256"):
        finetune(tiny(data_dir, tmp_path / "o", init_from=str(tiny_model_dir), block_size=512))
    other = tmp_path / "other-vocab"
    other.mkdir()
    for name in ("train.bin", "val.bin"):
        (other / name).write_bytes((data_dir / name).read_bytes())
    meta = json.loads((data_dir / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100277}))
    with pytest.raises(FakegptError, match="meta.json: vocab_size 100277 does not fit the model's vocabulary"):
        finetune(tiny(other, tmp_path / "o"))
    (other / "meta.json").write_text(json.dumps({"vocab_size": 100277}))  # not written by prepare
    with pytest.raises(FakegptError, match="meta.json: missing key 'dataset'"):
        finetune(tiny(other, tmp_path / "o"))
    (other / "meta.json").unlink()  # bins without meta.json: an interrupted or foreign data folder
    with pytest.raises(FakegptError, match="meta.json: no such file; .* not a complete prepared data folder"):
        finetune(tiny(other, tmp_path / "o"))
    (other / "meta.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(FakegptError, match="schema_version 99 .*newer fakegpt"):
        finetune(tiny(other, tmp_path / "o"))
    with pytest.raises(FakegptError, match="multiple of the number of processes \\(2\\)"):
        check(tiny(data_dir, tmp_path / "o", gradient_accumulation_steps=3), world_size=2)
    with pytest.raises(FakegptError, match="no resume state in .*o/state"):
        finetune(tiny(data_dir, tmp_path / "o", init_from="resume"))
    with pytest.raises(FakegptError, match="--nproc-per-node 4 under torchrun with 2 processes"):
        check(tiny(data_dir, tmp_path / "o", nproc_per_node=4, gradient_accumulation_steps=4), world_size=2)
    with pytest.raises(FakegptError, match="--nproc-per-node 2: only `fakegpt finetune` starts its processes"):
        finetune(tiny(data_dir, tmp_path / "o", nproc_per_node=2))  # in another stage's process (tune, validate)
    # --nproc-per-node: the accumulation split is checked once, before any process starts
    argv = ["finetune", "--data-dir", str(data_dir), "--init-from", "scratch", "--nproc-per-node", "2"]
    assert cli_main([*argv, "--gradient-accumulation-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fakegpt finetune: error: --gradient-accumulation-steps 3 must be a multiple of --nproc-per-node 2: the "
        "accumulation steps are split across the processes"
    ]
    # through the CLI: one line, exit status 2, naming the flag
    assert cli_main(["finetune", "--data-dir", str(data_dir), "--init-from", "scratch", "--batch-size", "0"]) == 2
    assert "fakegpt finetune: error: --batch-size: must be positive" in capsys.readouterr().err


def test_lr_schedule():
    cfg = FinetuneConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, decay_lr=True, max_iters=110)
    assert lr_at(cfg, 0) == pytest.approx(1e-3 / 11)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 110) == pytest.approx(1e-4)
    study = FinetuneConfig()  # the original study: constant 3e-5, 32,768 tokens per iteration
    assert {lr_at(study, i) for i in (0, 100, 4999)} == {3e-5}
    assert study.batch_size * study.gradient_accumulation_steps * study.block_size == 32768
    assert (study.eval_interval, study.eval_iters, study.always_save_checkpoint) == (5, 40, False)


def test_data_dir_as_mlflow_artifact_uri(data_dir, tmp_path):
    """The pipeline hands finetune `runs:/<prepare run>/data`: it is downloaded and trained on."""
    with tracking.run(stage="prepare", run_name="prep") as active:
        tracking.log_artifact(data_dir, artifact_path="data")
        prep_id = active.info.run_id
    cfg = tiny(f"runs:/{prep_id}/data", tmp_path / "out", max_iters=2, eval_interval=2, eval_iters=1)
    result = finetune(cfg)
    info = json.loads((result.checkpoint_dir / INFO_FILE).read_text())
    assert info["data"] == json.loads((data_dir / "meta.json").read_text())
    assert Path(info["config"]["data_dir"]).is_dir() and result.iters_done == 2
    assert _client().get_run(result.run_id).data.tags[tracking.TAG_DATA_URI] == f"runs:/{prep_id}/data"
