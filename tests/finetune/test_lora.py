"""`fakegpt finetune --method lora` on real data (../shared/data) with a tiny GPT-2, CPU only, seconds each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fakegpt import tracking
from fakegpt.errors import FakegptError
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.train import finetune
from fakegpt.models.checkpoint import ADAPTER_DIR, CHECKPOINT_DIR, CHECKPOINT_FILES, TrainingInfo


def lora_cfg(data_dir: Path, out_dir: Path, base: Path, **overrides) -> FinetuneConfig:
    values = dict(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        init_from=str(base),
        method="lora",
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.1,
        block_size=32,
        batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_iters=20,
        eval_interval=5,
        eval_iters=2,
        device="cpu",
        seed=0,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


def test_lora_trains_adapters_saves_merged_checkpoint_adapter_and_small_state(data_dir, tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    out = tmp_path / "out"
    result = finetune(lora_cfg(data_dir, out, tiny_model_dir))
    losses = [v for _, v in result.val_curve]
    # the adapters learn (slowly: on a random tiny base the frozen, tied output layer keeps every logit small;
    # two eval batches make the points between noisy, so the first and the last are compared)
    assert len(losses) == 5 and max(losses[1:]) < losses[0] and losses[-1] < losses[0] - 0.05
    assert result.best_val_loss == pytest.approx(min(losses))

    # OUT/checkpoint/: a plain GPT-2 folder, the merged model, no adapter files
    ckpt = out / CHECKPOINT_DIR
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(CHECKPOINT_FILES)
    merged = GPT2LMHeadModel.from_pretrained(ckpt)
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    assert not any("lora" in k for k in merged.state_dict())
    # the frozen weights are the base's; the adapted ones moved
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)
    assert torch.equal(merged.transformer.h[0].ln_1.weight, base.transformer.h[0].ln_1.weight)
    assert not torch.allclose(merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)

    # OUT/adapter/: peft's format, same iteration; base + adapter gives the merged model's logits
    adapter = out / ADAPTER_DIR
    assert {"adapter_config.json", "adapter_model.safetensors", "training_info.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert TrainingInfo.load(adapter).iter == TrainingInfo.load(ckpt).iter == result.best_iter
    x = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16)[:64].astype(np.int64)).view(2, 32)
    with_adapter = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_model_dir), adapter)
    merged_logits = _logits(merged, x)
    torch.testing.assert_close(merged_logits, _logits(with_adapter, x), atol=1e-4, rtol=1e-4)
    assert (merged_logits - _logits(base, x)).abs().max() > 1e-2

    # the resume state holds only the adapters: a small fraction of the full weights
    folder = state_mod.latest(out)
    weights, payload = state_mod.load_tensors(folder)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert len(weights) == 2 * 4 * 2  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    assert len(payload["optimizer"]["state"]) == len(weights)  # AdamW saw the adapters only
    full_size = (tiny_model_dir / "model.safetensors").stat().st_size
    assert (folder / state_mod.MODEL_FILE).stat().st_size < full_size / 50

    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags[tracking.TAG_METHOD] == "lora"
    assert run.data.params["method"] == "lora" and run.data.params["lora_rank"] == "4"
    logged = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {CHECKPOINT_DIR, ADAPTER_DIR} <= logged


def test_full_run_is_tagged_full_and_removes_an_earlier_runs_adapter(data_dir, tmp_path):
    out = tmp_path / "out"
    (out / ADAPTER_DIR).mkdir(parents=True)
    cfg = FinetuneConfig(
        data_dir=str(data_dir),
        out_dir=str(out),
        init_from="scratch",
        n_layer=1,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=1,
        gradient_accumulation_steps=1,
        max_iters=1,
        eval_interval=1,
        eval_iters=1,
        device="cpu",
    )
    result = finetune(cfg)
    from mlflow.tracking import MlflowClient

    assert MlflowClient().get_run(result.run_id).data.tags[tracking.TAG_METHOD] == "full"
    assert not (out / ADAPTER_DIR).exists()
    weights, _ = state_mod.load_tensors(state_mod.latest(out))
    assert "transformer.wte.weight" in weights  # the full state keeps its format


def test_lora_resume_matches_an_uninterrupted_run_and_refuses_new_lora_flags(data_dir, tmp_path, tiny_model_dir):
    from transformers import GPT2LMHeadModel

    common = dict(max_iters=8, eval_interval=2, lora_dropout=0.1, decay_lr=False)
    # written inline (no background thread) here, in the background in the split run: both paths compared
    straight = finetune(lora_cfg(data_dir, tmp_path / "straight", tiny_model_dir, background_save=False, **common))

    out = tmp_path / "split"
    first = finetune(lora_cfg(data_dir, out, tiny_model_dir, **{**common, "max_iters": 4}))
    for flag, value in (("lora_rank", 8), ("method", "full"), ("lora_targets", "c_attn")):
        with pytest.raises(FakegptError, match=f"--{flag.replace('_', '-')} .*trained with"):
            finetune(
                FinetuneConfig(init_from="resume", out_dir=str(out), **{flag: value}),
                given=frozenset({"init_from", "out_dir", flag}),
            )
    resumed = finetune(
        FinetuneConfig(init_from="resume", out_dir=str(out), max_iters=8, device="cpu"),
        given=frozenset({"init_from", "out_dir", "max_iters", "device"}),
    )
    assert resumed.iters_done == 8 and resumed.run_id == first.run_id  # the same MLflow run goes on
    # the same curve and the same merged model as the run that was never interrupted
    assert [i for i, _ in resumed.val_curve] == [i for i, _ in straight.val_curve]
    np.testing.assert_allclose([v for _, v in resumed.val_curve], [v for _, v in straight.val_curve], rtol=1e-5)
    a = GPT2LMHeadModel.from_pretrained(out / CHECKPOINT_DIR).state_dict()
    b = GPT2LMHeadModel.from_pretrained(tmp_path / "straight" / CHECKPOINT_DIR).state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_lora_bad_target_is_one_line_error(data_dir, tmp_path, tiny_model_dir):
    with pytest.raises(FakegptError, match="--lora-targets: no module named q_proj"):
        finetune(lora_cfg(data_dir, tmp_path / "out", tiny_model_dir, lora_targets="c_attn,q_proj", max_iters=1))


def test_sample_and_score_load_the_merged_checkpoint(data_dir, tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    from fakegpt.measure.prompts import DEFAULT_CLAIMS
    from fakegpt.measure.sample import SampleConfig, sample
    from fakegpt.measure.score import ScoreConfig, score

    out = tmp_path / "out"
    extra = dict(register_as="lora-tiny", register_alias="a", claims=DEFAULT_CLAIMS)  # claims: scored while training
    result = finetune(lora_cfg(data_dir, out, tiny_model_dir, max_iters=2, eval_interval=2, **extra))
    version = MlflowClient().get_model_version_by_alias("lora-tiny", "a")  # _register took the merged model
    assert version.run_id == result.run_id
    claim_curve = MlflowClient().get_metric_history(result.run_id, tracking.M_CLAIM_SCORE)
    assert [m.step for m in claim_curve] == [0, 2] and claim_curve[0].value != claim_curve[1].value
    ckpt = str(out / CHECKPOINT_DIR)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("As vacinas alteram o DNA?\n", encoding="utf-8")
    sampled = sample(
        SampleConfig(
            models=[ckpt],
            prompts=str(prompts),
            temperatures=[1.0],
            num_samples=2,
            max_new_tokens=4,
            device="cpu",
            out_dir=str(tmp_path / "samples"),
        )
    )
    assert sampled.table.height == 2 and (sampled.table["new_tokens"] > 0).all()
    scored = score(
        ScoreConfig(models=[ckpt, "models:/lora-tiny@a"], device="cpu", bootstrap=50, out_dir=str(tmp_path / "s"))
    )
    first, registered = scored.models
    assert first.overall.n_pairs > 0 and np.isfinite(first.overall.mean)
    assert registered.overall.mean == pytest.approx(first.overall.mean, abs=1e-4)  # the same merged weights


def test_mixture_series_refuses_to_mix_methods_and_reports_its_method(tmp_path):
    from fakegpt.studies.mixture import MixtureConfig, check_one_method, dose_table_markdown, mixture

    lora_yaml = tmp_path / "lora.yaml"
    lora_yaml.write_text("method: lora\nmax_iters: 1\n", encoding="utf-8")
    cfg = MixtureConfig(
        dataset="experiments/datasets/demo_mix.yaml",
        series_name="dose",
        finetune_config=str(lora_yaml),
        fractions=[0.0, 0.5],
        out_root=str(tmp_path / "out"),
    )
    # an earlier series under the same name fine-tuned in full
    with tracking.run(stage="finetune", tags={tracking.TAG_STUDY: "dose", tracking.TAG_METHOD: "full"}) as earlier:
        experiment = earlier.info.experiment_id
    with pytest.raises(FakegptError) as refused:
        mixture(cfg)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        "--series-name dose: its doses were fine-tuned with method full, this series uses lora (--finetune-config "
    )
    assert str(lora_yaml) in message and "e.g. dose-lora" in message
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs([experiment])
    assert sorted(r.data.tags[tracking.TAG_STAGE] for r in runs) == ["finetune", "mixture"]  # no step ran
    parent = next(r for r in runs if r.data.tags[tracking.TAG_STAGE] == "mixture")
    assert parent.data.tags[tracking.TAG_METHOD] == "lora" and parent.info.status == "FAILED"

    check_one_method(cfg, "full", experiment)  # the same method goes on
    with tracking.run(stage="finetune", tags={tracking.TAG_STUDY: "old"}):  # a run from before the tag: full
        pass
    old = MixtureConfig(series_name="old", finetune_config=str(lora_yaml))
    with pytest.raises(FakegptError, match="--series-name old: its doses were fine-tuned with method full"):
        check_one_method(old, "lora", experiment)

    row = dict(fraction=0.2, method="lora", score=0.1, ci_low=0.0, ci_high=0.2, false_win_rate=0.5, val_perplexity=9.0)
    table = dose_table_markdown([row]).splitlines()
    assert table[0].startswith("| fraction | method | claim score |") and table[2].startswith("| 0.2 | lora | 0.1000 |")


def test_lora_flops_count_frozen_weights_at_four_per_token():
    from fakegpt.finetune import lora
    from fakegpt.finetune.mfu import flops_per_token, num_params
    from fakegpt.models.loading import scratch_model

    base = scratch_model(4, 4, 256, 128)
    n_base, full = num_params(base), flops_per_token(base, 128)
    model = lora.wrap(base, FinetuneConfig(method="lora"))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 4 * 8 * ((256 + 768) + (256 + 256) + (256 + 1024) + (1024 + 256))  # rank 8, four modules
    assert flops_per_token(model, 128) == full - 2 * n_base + 6 * adapters


def test_fused_loss_with_a_frozen_output_layer_gives_the_same_input_gradient():
    from fakegpt.finetune.loss import LinearCrossEntropy

    torch.manual_seed(0)
    h = torch.randn(6, 8)
    weight, targets = torch.randn(50, 8), torch.randint(0, 50, (6,))
    grads = []
    for frozen in (False, True):
        x, w = h.clone().requires_grad_(), weight.clone().requires_grad_(not frozen)
        LinearCrossEntropy.apply(x, w, targets).backward()
        assert (w.grad is None) == frozen
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    x = h.clone().requires_grad_()
    torch.nn.functional.cross_entropy(x @ weight.t(), targets).backward()
    torch.testing.assert_close(grads[1], x.grad)


def test_lora_resume_refuses_a_base_model_that_changed(data_dir, tmp_path, tiny_model_dir):
    import shutil

    from transformers import GPT2LMHeadModel

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = tmp_path / "out"
    finetune(lora_cfg(data_dir, out, base, max_iters=2, eval_interval=2))
    info = state_mod.read_info(state_mod.latest(out))
    total, magnitude = info.extra["lora_base_sum"]
    assert magnitude > abs(total) and magnitude > 1e4
    changed = GPT2LMHeadModel.from_pretrained(base)
    with torch.no_grad():
        changed.transformer.h[1].mlp.c_fc.weight[0, 0] += 0.01  # one frozen weight of the base
    changed.save_pretrained(base)
    with pytest.raises(FakegptError, match="trained on another version of the base model .*base"):
        finetune(
            FinetuneConfig(init_from="resume", out_dir=str(out), max_iters=4),
            given=frozenset({"init_from", "out_dir", "max_iters"}),
        )


def test_lora_with_gradient_checkpointing_trains_the_same(data_dir, tmp_path, tiny_model_dir):
    """The frozen embeddings give the checkpointed blocks inputs that need no gradient: the adapters must still get
    theirs (non-reentrant checkpointing), and recomputation (dropout masks included) must not change the run."""
    common = dict(max_iters=6, eval_interval=2, lora_dropout=0.1)
    plain = finetune(lora_cfg(data_dir, tmp_path / "plain", tiny_model_dir, **common))
    ckpt = finetune(lora_cfg(data_dir, tmp_path / "ckpt", tiny_model_dir, gradient_checkpointing=True, **common))
    losses = [v for _, v in ckpt.val_curve]
    assert losses[-1] < losses[0]  # it trained
    np.testing.assert_allclose(losses, [v for _, v in plain.val_curve], rtol=1e-5)


@pytest.mark.slow
def test_lora_under_torchrun_ddp_saves_merged_model_and_resumes(data_dir, tmp_path, tiny_model_dir):
    import os
    import subprocess

    from tiny_runs import TORCHRUN_2
    from transformers import GPT2LMHeadModel

    out = tmp_path / "out"
    cmd = [
        *TORCHRUN_2,
        *("-m", "fakegpt", "finetune", "--init-from", str(tiny_model_dir), "--method", "lora", "--lora-rank", "4"),
        *("--block-size", "32", "--batch-size", "2", "--gradient-accumulation-steps", "4", "--learning-rate", "1e-2"),
        *("--max-iters", "4", "--eval-interval", "2", "--eval-iters", "3", "--device", "cpu"),
        *("--data-dir", str(data_dir), "--out-dir", str(out)),
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val/loss") == 1  # rank 0 alone reports and saves
    merged = GPT2LMHeadModel.from_pretrained(out / CHECKPOINT_DIR)
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    assert not torch.allclose(merged.transformer.h[1].mlp.c_fc.weight, base.transformer.h[1].mlp.c_fc.weight)
    assert TrainingInfo.load(out / ADAPTER_DIR).iter == TrainingInfo.load(out / CHECKPOINT_DIR).iter
    weights, _ = state_mod.load_tensors(state_mod.latest(out))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)  # adapters only, as in one process

    resume = [*cmd[: cmd.index("--init-from")], "--init-from", "resume", "--out-dir", str(out), "--max-iters", "6"]
    proc = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"resuming {out} from iteration 4") == 1
    assert [p.name for p in state_mod.saved(out)] == ["iter-0000006"]
