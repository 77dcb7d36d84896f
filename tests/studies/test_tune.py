"""`fakegpt tune`: Optuna studies of tiny scratch GPT-2 fine-tunes on real WhatsApp text, every trial in MLflow.

The trials are real `finetune` runs (1 layer, 32-wide, 1,024-token budgets, seconds each on a CPU). Workers in
other processes run `python -m fakegpt tune`, as a user would; the PostgreSQL test needs `tools/postgres.sh`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from fakegpt import config, tracking
from fakegpt.errors import FakegptError
from fakegpt.finetune.train import FinetuneConfig, finetune
from fakegpt.studies import optuna_storage, tune

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "sweeps" / "tiny.yaml"
DEFAULT = ROOT / "experiments" / "sweeps" / "default.yaml"
GOOD = {"learning_rate": 3e-2, "gradient_accumulation_steps": 1}
GOOD2 = {"learning_rate": 2e-2, "gradient_accumulation_steps": 2}
NAN = {"learning_rate": 1e4, "gradient_accumulation_steps": 1}  # AdamW steps of 1e4: the loss overflows
STALLED = {"learning_rate": 1e-6, "gradient_accumulation_steps": 1}  # learns nothing in 1,024 tokens


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """conftest's empty store plus the `fakegpt` experiment: workers starting together would race to create it,
    and its artifacts (plots, loss curves) go under this temporary folder instead of the working tree."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow-template")
    cwd = os.getcwd()
    os.chdir(folder)  # the experiment's artifacts go to this folder's mlruns/, not the working tree
    try:
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        mlflow.set_experiment(tracking.DEFAULT_EXPERIMENT)
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
    return folder / "mlflow.db"


@pytest.fixture
def data_dir(prepared_whatsapp, mlflow_template, tmp_path) -> Path:
    """Prepared real WhatsApp messages, and a fresh copy of the template MLflow store for this test."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")  # conftest points MLFLOW_TRACKING_URI here
    return prepared_whatsapp


def tiny(tmp_path: Path, data_dir: Path, **changes) -> tuple[tune.TuneConfig, FinetuneConfig, dict]:
    """The tiny sweep (experiments/sweeps/tiny.yaml), one validation batch per evaluation, no plots."""
    cfg, base, space, _ = tune.parse_args(
        [
            "--config",
            str(TINY),
            "--data-dir",
            str(data_dir),
            "--out-dir",
            str(tmp_path / "out"),
            "--eval-iters",
            "1",
            "--plots",
            "false",
        ]
    )
    return dataclasses.replace(cfg, **changes), base, space


def wide(space: dict) -> dict:
    """The search space opened wide enough for NAN and STALLED."""
    return dict(space, learning_rate={"type": "float", "low": 1e-7, "high": 1e5, "log": True})


def load(cfg: tune.TuneConfig, base: FinetuneConfig) -> optuna.Study:
    url = optuna_storage.storage_url(cfg.storage, base.out_dir)
    return optuna.load_study(study_name=cfg.study_name, storage=optuna_storage.open_storage(url, 0, None))


def trial_runs(parent_run_id: str) -> dict[int, object]:
    """trial number -> its MLflow run (nested under parent_run_id)."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {int(r.data.tags[tracking.TAG_TRIAL]): r for r in runs}


def worker(cfg: tune.TuneConfig, base: FinetuneConfig, *extra: str) -> subprocess.Popen:
    """`python -m fakegpt tune` in another process, on the same storage and MLflow store."""
    argv = [
        sys.executable,
        "-m",
        "fakegpt",
        "tune",
        "--config",
        str(TINY),
        "--study-name",
        cfg.study_name,
        "--storage",
        cfg.storage,
        "--data-dir",
        base.data_dir,
        "--out-dir",
        base.out_dir,
        "--eval-iters",
        "1",
        "--plots",
        "false",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, proc: subprocess.Popen, what: str, limit: float = 120.0) -> None:
    """Poll `condition` while the worker runs (a limit against hangs, not a timing assertion)."""
    end = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"no {what} after {limit:.0f} s")
        time.sleep(0.3)


# --- the study -----------------------------------------------------------------------------------------------


def test_study_records_complete_failed_and_pruned_trials_as_nested_runs(tmp_path, data_dir):
    # GOOD, then a NaN loss (fails; the study goes on), GOOD2, then a stalled learning rate: pruned at its first
    # evaluation because two finished trials were far lower there.
    cfg, base, space = tiny(tmp_path, data_dir, n_trials=4, plots=True)
    result = tune.tune(cfg, base, wide(space), [GOOD, NAN, GOOD2, STALLED])

    study = load(cfg, base)
    states = {t.number: t.state for t in study.trials}
    assert states == {
        0: optuna.trial.TrialState.COMPLETE,
        1: optuna.trial.TrialState.FAIL,
        2: optuna.trial.TrialState.COMPLETE,
        3: optuna.trial.TrialState.PRUNED,
    }
    assert result.states == {0: "complete", 1: "failed", 2: "complete", 3: "pruned"}
    assert "NonFiniteLossError" in study.trials[1].user_attrs["error"]
    # Equal token budgets: accumulation 1 and 2 report at the same token counts (each half of the budget).
    assert sorted(study.trials[0].intermediate_values) == [512, 1024]
    assert sorted(study.trials[2].intermediate_values) == [512, 1024]
    assert list(study.trials[3].intermediate_values) == [512]
    assert study.trials[0].value == pytest.approx(min(study.trials[0].intermediate_values.values()))
    assert study.trials[0].value < 10.0 < study.trials[3].intermediate_values[512]  # ln(50257) = 10.8 at start

    runs = trial_runs(result.parent_run_id)
    assert sorted(runs) == [0, 1, 2, 3]
    assert {n: r.data.tags[tracking.TAG_TRIAL_STATE] for n, r in runs.items()} == result.states
    assert {n: r.info.status for n, r in runs.items()} == {0: "FINISHED", 1: "FAILED", 2: "FINISHED", 3: "KILLED"}
    assert float(runs[2].data.params["learning_rate"]) == GOOD2["learning_rate"]
    assert runs[2].data.params["gradient_accumulation_steps"] == "2"
    assert runs[2].data.params["max_iters"] == "4" and runs[0].data.params["max_iters"] == "8"
    assert "NonFiniteLossError" in runs[1].data.tags[tracking.TAG_ERROR]

    import mlflow

    client = mlflow.tracking.MlflowClient()
    curve = client.get_metric_history(runs[2].info.run_id, tracking.M_TUNE_VAL_LOSS)
    assert [m.step for m in curve] == [0, 512, 1024]
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags[tracking.TAG_STUDY] == cfg.study_name and parent.data.tags[tracking.TAG_STAGE] == "tune"
    best = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert result.best_trial == best.number and result.best_value == best.value
    assert parent.data.metrics[tracking.M_TUNE_BEST_VALUE] == pytest.approx(best.value)
    assert float(parent.data.params["best.learning_rate"]) == best.params["learning_rate"]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/contour_lr_accum.png"} <= artifacts
    assert not (Path(base.out_dir) / "tiny" / "trial-0000" / "checkpoint").exists()  # keep_checkpoints: false

    # The best configuration is a ready-to-run finetune YAML for the same token budget.
    text = result.best_config.read_text(encoding="utf-8")
    assert text.startswith("# Best trial") and "fakegpt finetune --config" in text
    best_cfg = config.from_dict(FinetuneConfig, yaml.safe_load(text), str(result.best_config))
    assert best_cfg.learning_rate == best.params["learning_rate"]
    assert best_cfg.max_iters * tune.tokens_per_iter(best_cfg) == cfg.token_budget


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_study_resumes_with_the_next_number(tmp_path, data_dir):
    cfg, base, space = tiny(tmp_path, data_dir, n_trials=2)

    def interrupted(tcfg, hooks, **kwargs):  # the user presses Ctrl-C at the first evaluation after iter 0
        (pruning,) = hooks

        def press(ev):
            pruning.on_eval(ev)
            if ev.iter > 0:
                raise KeyboardInterrupt

        return finetune(tcfg, press, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        tune.tune(cfg, base, space, [GOOD], finetune_fn=interrupted)
    study = load(cfg, base)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    assert study.trials[0].user_attrs["error"] == "interrupted (Ctrl-C)"

    import mlflow

    (parent,) = mlflow.search_runs(filter_string=f"tags.`{tracking.TAG_STAGE}` = 'tune'", output_format="list")
    assert parent.info.status == "KILLED"
    assert trial_runs(parent.info.run_id)[0].data.tags[tracking.TAG_TRIAL_STATE] == "failed"

    resumed = tune.tune(dataclasses.replace(cfg, n_trials=1), base, space, [GOOD])  # the same command again
    assert resumed.trials_run == [1] and resumed.states == {1: "complete"}
    assert [t.state for t in load(cfg, base).trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert resumed.best_trial == 1


@pytest.mark.slow
def test_a_trial_failed_by_another_worker_does_not_stop_this_one(tmp_path, data_dir):
    cfg, base, space = tiny(tmp_path, data_dir, n_trials=2)
    taken: list[int] = []

    def taken_over(tcfg, hooks, **kwargs):  # another worker declares the first trial dead (e.g. after a stall)
        (pruning,) = hooks

        def eval_(ev):
            if not taken:
                study = load(cfg, base)
                study._storage.set_trial_state_values(study.trials[-1]._trial_id, optuna.trial.TrialState.FAIL)
                taken.append(study.trials[-1].number)
            pruning.on_eval(ev)

        return finetune(tcfg, eval_, **kwargs)

    result = tune.tune(cfg, base, space, [GOOD], finetune_fn=taken_over)
    assert taken == [0] and result.trials_run == [0, 1]
    assert result.states == {0: "failed", 1: "complete"}


@pytest.mark.slow
def test_two_processes_share_one_study_and_a_stale_trial_is_failed(tmp_path, data_dir):
    cfg, base, space = tiny(tmp_path, data_dir, n_trials=1, study_name="shared", heartbeat_interval=2)
    cfg = dataclasses.replace(cfg, storage=str(tmp_path / "optuna.db"))  # the default kind: one SQLite file
    storage = optuna_storage.open_storage(optuna_storage.storage_url(cfg.storage, base.out_dir), 2, None)
    study = optuna.create_study(study_name=cfg.study_name, storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize": we fake a worker
        lost = study.ask()  # what a worker on another machine leaves when it loses power mid-trial
    lost.set_user_attr("worker", "elsewhere:4242")
    storage.record_heartbeat(lost._trial_id)
    beat = time.monotonic()

    other = worker(cfg, base, "--n-trials", "1", "--heartbeat-interval", "2")  # all workers: the same interval
    wait_until(lambda: len(load(cfg, base).trials) > 1, other, "trial of the other worker")
    # Past the lost trial's grace period (2 x 2 s), with a margin: SQLite's CURRENT_TIMESTAMP, which the stale
    # check compares against, has whole-second resolution.
    time.sleep(max(0.0, beat + 6.5 - time.monotonic()))
    mine = tune.tune(cfg, base, space, [GOOD])
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0, out

    trials = load(cfg, base).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]  # the lost trial + one from each worker
    assert trials[0].state == optuna.trial.TrialState.FAIL  # failed by a live worker, not left RUNNING
    assert all(t.state.is_finished() for t in trials)
    workers = [t.user_attrs["worker"] for t in trials[1:]]
    assert workers.count(optuna_storage.worker_id()) == 1 and len(set(workers)) == 2
    assert len(mine.trials_run) == 1
    assert "best configuration:" in out


@pytest.mark.slow
def test_a_killed_worker_leaves_a_failed_trial_not_a_complete_one(tmp_path, data_dir):
    import mlflow

    cfg, base, space = tiny(tmp_path, data_dir, n_trials=1, study_name="killed")
    cfg = dataclasses.replace(cfg, storage=str(tmp_path / "study.log"))  # Optuna's journal file
    # A worker whose first evaluation is slow (many validation batches): killed while its trial runs.
    victim = worker(cfg, base, "--eval-iters", "400")

    def trial_run_started() -> bool:
        runs = mlflow.search_runs(filter_string=f"tags.`{tracking.TAG_TRIAL}` = '0'", output_format="list")
        return bool(runs) and runs[0].info.status == "RUNNING"

    wait_until(trial_run_started, victim, "running trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert load(cfg, base).trials[0].state == optuna.trial.TrialState.RUNNING

    result = tune.tune(cfg, base, space, [GOOD])  # the next run notices the dead worker and goes on
    trials = load(cfg, base).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert "died mid-trial" in trials[0].user_attrs["error"]
    assert result.trials_run == [1] and result.best_trial == 1
    (dead,) = mlflow.search_runs(filter_string=f"tags.`{tracking.TAG_TRIAL}` = '0'", output_format="list")
    assert dead.info.status == "FAILED" and dead.data.tags[tracking.TAG_TRIAL_STATE] == "failed"


# --- PostgreSQL: the multi-worker path with a server database -------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_a_study_on_postgresql(tmp_path, data_dir, postgres_url):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    cfg, base, space = tiny(tmp_path, data_dir, n_trials=1, study_name=name, storage=postgres_url)
    try:
        other = worker(cfg, base, "--n-trials", "1")
        wait_until(lambda: name in optuna.get_all_study_names(postgres_url), other, "study on the server")
        mine = tune.tune(cfg, base, space, [GOOD])
        out, _ = other.communicate(timeout=300)
        assert other.returncode == 0, out
        trials = optuna.load_study(study_name=name, storage=postgres_url).trials
        assert sorted(t.number for t in trials) == [0, 1]
        assert all(t.state.is_finished() for t in trials)
        assert len({t.user_attrs["worker"] for t in trials}) == 2 and len(mine.trials_run) == 1
        assert "postgresql+psycopg://" in mine.storage and ":***@" in mine.storage  # no password in logs
    finally:
        optuna.delete_study(study_name=name, storage=postgres_url)


# --- configuration: sweep YAML, flags, budgets, storage (no training) -------------------------------------------


def test_default_sweep_is_the_issue_search_space_with_an_exact_evaluation_grid():
    cfg, base, space, enqueue = tune.parse_args(
        ["--config", str(DEFAULT), "--n-trials", "3", "--n-layer", "2", "--learning-rate", "1e-4"]
    )
    assert cfg.n_trials == 3 and base.n_layer == 2 and base.learning_rate == 1e-4  # flags of both dataclasses
    assert space["learning_rate"] == {"type": "float", "low": 1e-6, "high": 1e-3, "log": True}
    assert space["gradient_accumulation_steps"]["choices"] == [1, 2, 4, 8, 16, 32, 64]
    assert enqueue == [{"learning_rate": 3e-5, "gradient_accumulation_steps": 32}]
    for accum in (1, 8, 64):
        tcfg = tune.trial_config(
            base, {"gradient_accumulation_steps": accum, "learning_rate": 2e-4}, cfg.token_budget, cfg.n_evals, "x"
        )
        per_iter = tune.tokens_per_iter(tcfg)
        assert tcfg.max_iters * per_iter == cfg.token_budget  # the same data for every accumulation
        evals = [i * per_iter for i in range(tcfg.eval_interval, tcfg.max_iters + 1, tcfg.eval_interval)]
        assert evals == [cfg.token_budget * k // 10 for k in range(1, 11)]
        assert tcfg.min_lr == pytest.approx(2e-4 * base.min_lr / base.learning_rate)


def test_mlflow_run_parameters_override_the_sweep(monkeypatch):
    """`mlflow run -e tune -P n_trials=20` passes `--n_trials 20`: given values win, the rest comes from the YAML."""
    cfg, base, _, _ = tune.parse_args(["--config", str(TINY), "--n_trials", "20", "--n_layer", "3"])
    assert (cfg.n_trials, cfg.token_budget) == (20, 1024)
    assert (base.init_from, base.out_dir, base.n_layer) == ("scratch", "out/tune-tiny", 3)


def test_warmup_keeps_its_tokens_and_an_inexact_budget_still_reports_on_the_grid():
    base = FinetuneConfig(batch_size=2, block_size=16, gradient_accumulation_steps=4, warmup_iters=10)
    tcfg = tune.trial_config(base, {"gradient_accumulation_steps": 1}, 5000, 10, "x")
    assert tcfg.max_iters == 157 and tcfg.warmup_iters == 40 and tcfg.lr_decay_iters == 157
    assert tune.grid_step(15 * 32, 5000, 10, final=False) == 500
    assert tune.grid_step(157 * 32, 5000, 10, final=True) == 5000


def test_sweep_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    cases = {
        "search_space: {learning_rat: {type: float, low: 1.0e-6, high: 1.0e-3}}": "search_space.learning_rat",
        "search_space: {learning_rate: {type: float, low: 0, high: 1.0e-3, log: true}}": "low > 0",
        "search_space: {max_iters: {type: int, low: 1, high: 9}}": "tune sets this field",
        "search_space: {gradient_accumulation_steps: {type: categorical, choices: []}}": "non-empty list",
        "base: {n_layr: 2}": "base: unknown key 'n_layr'",
        "n_trails: 2": "unknown key 'n_trails'",
        "enqueue: [{dropout: 0.1}]": r"enqueue\[0\]: .dropout. is not in the search space",
    }
    for text, message in cases.items():
        bad.write_text(text + "\n", encoding="utf-8")
        with pytest.raises(FakegptError, match=message) as err:
            tune.parse_args(["--config", str(bad)])
        assert str(bad) in str(err.value)


def test_cli_rejects_bad_settings_in_one_line(tmp_path, data_dir, capsys):
    from fakegpt import cli

    out = str(tmp_path / "out")
    assert (
        cli.main(["tune", "--config", str(TINY), "--data-dir", str(data_dir), "--out-dir", out, "--pruner", "medain"])
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        "fakegpt tune: error: --pruner: expected one of none, median, percentile, hyperband, successive-halving, "
        "got 'medain'"
    ]
    assert cli.main(["tune", "--config", str(TINY), "--data-dir", str(tmp_path / "nope"), "--out-dir", out]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "tune",
                "--config",
                str(TINY),
                "--data-dir",
                str(data_dir),
                "--out-dir",
                out,
                "--storage",
                "postgresql+psycopg://u:secret@127.0.0.1:9/db",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("fakegpt tune: error: --storage postgresql+psycopg://u:***@127.0.0.1:9/db")
    assert "secret" not in err


def test_a_study_keeps_its_token_budget(tmp_path, data_dir):
    cfg, base, space = tiny(tmp_path, data_dir)
    study = optuna.create_study(study_name=cfg.study_name, storage=optuna_storage.storage_url("", base.out_dir))
    tune.check_same_budget(study, cfg)
    with pytest.raises(FakegptError, match="--token-budget 2048: study 'tiny' was created with token_budget 1024"):
        tune.check_same_budget(study, dataclasses.replace(cfg, token_budget=2048))


def test_storage_spec(tmp_path):
    assert optuna_storage.storage_url("", str(tmp_path)) == f"sqlite:///{tmp_path}/optuna.db"
    assert optuna_storage.storage_url(str(tmp_path / "s.log"), "x") == f"journal:{tmp_path}/s.log"
    assert optuna_storage.storage_url(str(tmp_path / "s.sqlite"), "x") == f"sqlite:///{tmp_path}/s.sqlite"
    assert optuna_storage.storage_url("postgresql+psycopg://u:p@h/db", "x") == "postgresql+psycopg://u:p@h/db"
