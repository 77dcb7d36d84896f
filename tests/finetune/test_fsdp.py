"""`fakegpt finetune --parallel fsdp`: FSDP2 under torchrun with 2 gloo CPU processes (slow), full-state
checkpoints, resume under fsdp and in one process, and the pure helpers of fakegpt.finetune.fsdp."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_runs import TORCHRUN_2, tiny_config

from fakegpt import tracking
from fakegpt.errors import FakegptError
from fakegpt.finetune import fsdp
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.checks import check
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.saving import SaveSchedule
from fakegpt.finetune.setup import build_optimizer
from fakegpt.finetune.train import finetune
from fakegpt.models.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILES, INFO_FILE

ROOT = Path(__file__).resolve().parents[2]


def _tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=100))


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _torchrun(data_dir: Path, out: Path, *flags: str) -> list[str]:
    return [
        *TORCHRUN_2,
        "-m",
        "fakegpt",
        "finetune",
        "--parallel",
        "fsdp",
        "--device",
        "cpu",
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out),
        *flags,
    ]


@pytest.mark.slow
def test_fsdp_two_processes_saves_full_checkpoint_and_resumes(data_dir, tmp_path):
    """FSDP with 2 gloo processes finishes, saves one full checkpoint and resumes (under fsdp, then in one
    process: the state is saved whole)."""
    out = tmp_path / "out"
    shape = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32", "--batch-size", "2"]
    # 3 evaluation micro-batches over 2 ranks: rank 1 runs an uncounted forward to keep the gathers in step;
    # a state due by time at every step: every rank takes part in each of these saves (a gather)
    run = [*shape, "--gradient-accumulation-steps", "4", "--learning-rate", "3e-3", "--eval-iters", "3"]
    run += ["--save-every-minutes", "1e-6"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = _torchrun(data_dir, out, "--init-from", "scratch", *run, "--max-iters", "6", "--eval-interval", "3")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val/loss") == 1  # only rank 0 reports
    client = _client()
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fakegpt").experiment_id])
    assert mlflow_run.data.params["parallel"] == "fsdp"
    val = sorted(client.get_metric_history(mlflow_run.info.run_id, tracking.M_VAL_LOSS), key=lambda m: m.step)
    assert [m.step for m in val] == [0, 3, 6] and val[-1].value < val[0].value

    # one full HF checkpoint (not shards), loadable by transformers, equal to the gathered model of the state
    from transformers import GPT2LMHeadModel

    ckpt = out / CHECKPOINT_DIR
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CHECKPOINT_FILES)
    assert json.loads((ckpt / INFO_FILE).read_text())["iter"] == 6  # the last evaluation was the best
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    (folder,) = state_mod.saved(out)
    assert folder.name == "iter-0000006"
    weights, payload = state_mod.load_tensors(folder)
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]  # one tensor, as one process saves
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    # the optimizer state is whole and keyed like one process's AdamW: it loads into an unsharded optimizer
    assert all(isinstance(k, int) for k in payload["optimizer"]["state"])
    exp_avg = payload["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.shape == model.transformer.wte.weight.shape and exp_avg.abs().sum() > 0
    cfg = FinetuneConfig(init_from="scratch", learning_rate=3e-3)
    build_optimizer(model, cfg).load_state_dict(payload["optimizer"])

    # the end state links the best model's file (its last evaluation was the best): the same bytes once on disk
    assert (folder / state_mod.LINKED_MODEL_FILE).stat().st_ino == (ckpt / "model.safetensors").stat().st_ino

    # resume under fsdp: both ranks continue from iteration 6 with the saved configuration, now with gradient
    # checkpointing (a flag that may change on resume) inside the sharded blocks
    cmd = _torchrun(data_dir, out, "--init-from", "resume", "--max-iters", "8", "--gradient-checkpointing", "true")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"resuming {out} from iteration 6") == 1
    assert re.search(r"changed on resume: .*gradient_checkpointing [Ff]alse->[Tt]rue", proc.stderr)
    hist = client.get_metric_history(mlflow_run.info.run_id, tracking.M_TRAIN_LOSS)
    assert sorted(m.step for m in hist) == list(range(1, 9))
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000008"]

    # the state saved under fsdp resumes in one process (parallel is taken from this invocation)
    resumed = finetune(FinetuneConfig(init_from="resume", out_dir=str(out), max_iters=9, device="cpu"))
    assert resumed.iters_done == 9 and [p.name for p in state_mod.saved(out)] == ["iter-0000009"]
    assert state_mod.read_info(state_mod.latest(out)).config["parallel"] == "ddp"


@pytest.mark.slow
def test_fsdp_two_processes_shard_a_llama_by_its_decoder_layers(data_dir, tmp_path, tiny_llama_dir):
    """A tiny Llama (untied output layer) under FSDP: its LlamaDecoderLayers are the units; the full checkpoint
    is a Llama again, equal to the gathered weights of the state, and the state resumes in one process."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "out"
    run = ["--init-from", str(tiny_llama_dir), "--block-size", "32", "--batch-size", "2", "--eval-iters", "2"]
    run += ["--gradient-accumulation-steps", "2", "--learning-rate", "3e-3", "--max-iters", "4", "--eval-interval", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(_torchrun(data_dir, out, *run), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val/loss") == 1
    client = _client()
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fakegpt").experiment_id])
    val = sorted(client.get_metric_history(mlflow_run.info.run_id, tracking.M_VAL_LOSS), key=lambda m: m.step)
    assert [m.step for m in val] == [0, 2, 4] and val[-1].value < val[0].value
    model = LlamaForCausalLM.from_pretrained(out / CHECKPOINT_DIR)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    weights, _ = state_mod.load_tensors(state_mod.latest(out))
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    resumed = finetune(FinetuneConfig(init_from="resume", out_dir=str(out), max_iters=5, device="cpu"))
    assert resumed.iters_done == 5


def test_fsdp_units_are_the_models_own_decoder_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fakegpt.models.architecture import decoder_layers

    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    )
    assert [type(m).__name__ for m in decoder_layers(llama)] == ["LlamaDecoderLayer"] * 3
    assert decoder_layers(llama) == list(llama.model.layers)
    gpt2 = _tiny_model()
    assert decoder_layers(gpt2) == list(gpt2.transformer.h)


@pytest.mark.slow
def test_state_of_one_process_resumes_under_fsdp(data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(data_dir, out, max_iters=3, eval_interval=3)
    finetune(cfg)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        _torchrun(data_dir, out, "--init-from", "resume", "--max-iters", "4"),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"resuming {out} from iteration 3") == 1
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000004"]
    assert state_mod.read_info(state_mod.latest(out)).config["parallel"] == "fsdp"


def test_optimizer_state_by_name_and_by_index_round_trip():
    """One process's AdamW state (by index) and torch.distributed.checkpoint's (by parameter name) convert
    into each other; the tied wte / lm_head is one parameter, named as DCP names it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _tiny_model()
    optimizer = build_optimizer(model, FinetuneConfig())
    model(input_ids=torch.randint(0, 100, (2, 8))).logits.sum().backward()
    optimizer.step()
    indexed = optimizer.state_dict()
    names = fsdp.param_names(model, optimizer)
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    named = fsdp.to_named(indexed, names)
    dcp = get_optimizer_state_dict(model, optimizer)
    assert set(named["state"]) == set(dcp["state"])
    assert [g["params"] for g in named["param_groups"]] == [g["params"] for g in dcp["param_groups"]]
    back = fsdp.to_indexed(dcp, names)
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in indexed["param_groups"]]
    for i, value in indexed["state"].items():
        assert torch.equal(back["state"][i]["exp_avg"], value["exp_avg"])
    with pytest.raises(KeyError):
        fsdp.to_named({"state": {len(names): {}}, "param_groups": []}, names)


def test_retie_shares_tied_weights_again():
    model = _tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["lm_head.weight"] is not state["transformer.wte.weight"]
    tied = fsdp.retie(state, model)
    assert tied["lm_head.weight"] is tied["transformer.wte.weight"]
    assert tied["transformer.wpe.weight"] is not tied["transformer.wte.weight"]


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"dtype": "float16"}, "--dtype float16"),
        ({"optimizer": "adamw8bit"}, "--optimizer adamw8bit"),
        ({"method": "lora"}, "--method lora"),
        ({"claims": "experiments/claims/x.yaml"}, "--claims"),
    ],
)
def test_fsdp_refuses_what_it_does_not_support(data_dir, tmp_path, overrides, flag):
    cfg = FinetuneConfig(data_dir=str(data_dir), out_dir=str(tmp_path), init_from="scratch", parallel="fsdp")
    with pytest.raises(FakegptError, match=f"^{flag} with --parallel fsdp: "):
        check(dataclasses.replace(cfg, **overrides), 2)
    if "claims" not in overrides:  # (a claims file must exist; the combination is what is refused)
        check(dataclasses.replace(cfg, **overrides, parallel="ddp"), 2)  # fine under ddp


class _At:
    it, last_eval_iter = 0, -1


def test_save_schedule_shared_decision_without_process_group():
    """Outside torchrun the broadcast of the time-based decision is the identity."""
    cfg = FinetuneConfig(save_interval=0, save_every_minutes=1e-9)
    schedule = SaveSchedule(cfg, _At(), torch.device("cpu"))
    assert schedule.due(1) and not schedule.due(0)


def test_save_schedule_takes_rank_0s_time_decision(monkeypatch):
    """Under FSDP the broadcast (rank 0's clock) overrides this rank's own clock; iteration-based decisions and
    DDP's schedule (no device) do not broadcast at all."""
    from fakegpt.finetune import distributed

    calls: list[bool] = []
    monkeypatch.setattr(distributed, "broadcast_flag", lambda flag, device: calls.append(flag) or False)
    cfg = FinetuneConfig(save_interval=0, save_every_minutes=1e-9)
    assert not SaveSchedule(cfg, _At(), torch.device("cpu")).due(1) and calls == [True]
    assert SaveSchedule(cfg, _At()).due(1) and calls == [True]
    assert SaveSchedule(FinetuneConfig(save_interval=2, save_every_minutes=0), _At(), torch.device("cpu")).due(2)
    assert calls == [True]
