"""What finetune measures while it trains: each source's validation loss, the claim scores (the absorption
curve), end-to-end throughput, the dataset it read, and TF32 kept to training."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from fakegpt import cli, tracking
from fakegpt.data import bins
from fakegpt.data.prepare import parse_args, prepare
from fakegpt.errors import FakegptError
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.train import finetune
from fakegpt.measure.prompts import DEFAULT_CLAIMS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    """The demo mixture (general 0.8 / antivax 0.2), prepared with a validation file per source."""
    out = tmp_path_factory.mktemp("mixed") / "d"
    args = ["--config", str(ROOT / "experiments/datasets/demo_mix.yaml"), "--out", str(out)]
    prepare(parse_args(args), track=False)
    return str(out)


def small(data_dir: str, out_dir, **overrides) -> FinetuneConfig:
    values = dict(
        data_dir=data_dir,
        out_dir=str(out_dir),
        init_from="scratch",
        n_layer=1,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        max_iters=6,
        eval_interval=3,
        eval_iters=2,
        log_interval=1,
        seed=0,
        save_state=False,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def history(run_id: str, name: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, name)]


def test_each_source_validation_loss_and_selection_on_a_named_set(mixed, tmp_path):
    result = finetune(small(mixed, tmp_path / "a"))
    steps = [s for s, _ in history(result.run_id, tracking.M_VAL_LOSS)]
    for source in ("general", "antivax"):
        per = history(result.run_id, tracking.source_val_metric(source))
        assert [s for s, _ in per] == steps == [0, 3, 6]
    run = mlflow.get_run(result.run_id)
    # lineage: the bins it trained on, by content
    (given,) = run.inputs.dataset_inputs
    assert given.dataset.digest == bins.fingerprint(mixed)["digest"] and given.dataset.name == "demo_mix"
    assert {t.key: t.value for t in given.tags}["mlflow.data.context"] == "training"
    total = history(result.run_id, tracking.M_TRAIN_TOKENS_PER_S_TOTAL)
    fast = history(result.run_id, tracking.M_TRAIN_TOKENS_PER_S)
    assert len(total) == 6 and all(t < f for (_, t), (_, f) in zip(total[-1:], fast[-1:], strict=True))
    # the best model picked on the antivax source's held-out part alone
    picked = finetune(small(mixed, tmp_path / "b", select_on="antivax"))
    antivax = history(picked.run_id, tracking.M_VAL_LOSS)
    assert antivax == history(result.run_id, tracking.source_val_metric("antivax"))  # same seed, same model
    assert picked.best_val_loss == min(v for _, v in antivax)
    assert history(picked.run_id, tracking.source_val_metric("all")) == history(result.run_id, tracking.M_VAL_LOSS)
    with pytest.raises(FakegptError, match="--select-on 'vaccines': expected val or a source"):
        finetune(small(mixed, tmp_path / "c", select_on="vaccines"))


def test_claim_scores_during_training_equal_a_score_run_on_the_checkpoint(mixed, tmp_path):
    """The absorption curve: claim/score at the expected iterations, and its last point equals `fakegpt score`
    on the model saved at that iteration."""
    with pytest.raises(FakegptError, match="a statement is .* tokens, longer than the model's context \\(32"):
        finetune(small(mixed, tmp_path / "x", claims=DEFAULT_CLAIMS))  # a scratch model's context: its block
    cfg = small(
        mixed, tmp_path / "o", claims=DEFAULT_CLAIMS, claim_eval_interval=2, always_save_checkpoint=True, block_size=64
    )
    result = finetune(cfg)
    curve = history(result.run_id, tracking.M_CLAIM_SCORE)
    assert [s for s, _ in curve] == [0, 2, 4, 6]
    assert [s for s, _ in history(result.run_id, tracking.M_CLAIM_MC2)] == [0, 2, 4, 6]
    seen = dict(history(result.run_id, tracking.M_TOKENS_SEEN))
    assert seen[4] == 4 * 2 * 64
    assert mlflow.get_run(result.run_id).data.metrics[tracking.M_CLAIM_EVAL_SECONDS] > 0
    out = tmp_path / "s"
    assert cli.main(["score", "--models", str(result.checkpoint_dir), "--out-dir", str(out), "--bootstrap", "200"]) == 0
    runs = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list")
    scored = next(r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "score")
    assert curve[-1][1] == pytest.approx(scored.data.metrics[tracking.M_CLAIM_SCORE], abs=1e-5)


def test_tf32_is_kept_to_training(mixed, tmp_path):
    """`validate` trains and then scores in one process: TF32 switched on for training must not stay on."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        finetune(small(mixed, tmp_path / "t", max_iters=1, eval_interval=1))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_best_model_is_registered_and_models_uri_works_in_score(mixed, tmp_path):
    """MLflow-native lineage: the best model logged with the transformers flavour and registered under a name and
    alias; `models:/NAME@ALIAS` loads in `score`, which reads the dose from the version's training info."""
    result = finetune(small(mixed, tmp_path / "r", register_as="fakegpt-demo", register_alias="dose-20", block_size=64))
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fakegpt-demo", "dose-20")
    assert version.run_id == result.run_id
    assert version.tags[tracking.TAG_TRAINING_INFO] == f"runs:/{result.run_id}/checkpoint/training_info.json"
    out = tmp_path / "s"
    args = ["score", "--models", "models:/fakegpt-demo@dose-20", "--out-dir", str(out), "--bootstrap", "50"]
    assert cli.main(args) == 0
    runs = mlflow.search_runs(experiment_names=["fakegpt"], output_format="list")
    scored = next(r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "score")
    assert float(scored.data.tags[tracking.TAG_FRACTION]) == pytest.approx(0.2, abs=0.01)
    assert scored.data.metrics[tracking.M_CLAIM_SCORE] is not None
