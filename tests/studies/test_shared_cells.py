"""A series shared by machines (`fakegpt mixture --storage URL`): cells claimed through an Optuna study, a dead
worker's cell handed on and its fine-tune continued, failures retried then reported, the SLURM array.

The fast tests run the worker loop in this process on a SQLite study with the cells' steps replaced (what a
cell computes is tested in test_main.py). The slow ones run the real series, a tiny scratch model on the demo
mixture (2 doses x 1 seed), with workers as processes (`python -m fakegpt mixture`), as on several machines;
the PostgreSQL one needs `tools/postgres.sh`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from fakegpt import config, tracking
from fakegpt.errors import FakegptError
from fakegpt.studies import optuna_storage, shared_cells, slurm
from fakegpt.studies.dose_response import Cell
from fakegpt.studies.main import resolve_user_paths
from fakegpt.studies.mixture import MixtureConfig, check

ROOT = Path(__file__).resolve().parents[2]
# The numbers of a dose-response row that must agree between a one-process series and a shared one.
COMPARED = ("score", "ci_low", "ci_high", "false_win_rate", "val_perplexity", "vs_zero", "vs_zero_ci_low")


def trials_of(study: optuna.Study, kind: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if shared_cells.fixed(t).get(shared_cells.KIND) == kind]


# --- the worker loop on a SQLite study, with the steps replaced ------------------------------------------------


@pytest.fixture
def fake_steps(monkeypatch):
    """Setup that prepares nothing, cells that succeed (or fail, per dose) at once, and a report that records the
    grid it was given: the claiming, retrying and reporting of the study itself is what runs."""
    ran: list[tuple[float, int, str]] = []
    failing: set[float] = set()
    reported: list[list[Cell]] = []

    def run_cell(cfg, job, lookup=False, parent_run=""):
        ran.append((job.fraction, job.seed, parent_run))
        if job.fraction in failing:
            return Cell(job.fraction, job.seed, status="failed", error="step 'finetune' failed: CUDA out of memory")
        runs = {"finetune": "ft", "sample": "sa", "score": f"sc-{job.fraction:g}"}
        return Cell(job.fraction, job.seed, runs, {tracking.M_CLAIM_SCORE: job.fraction / 10})

    def report(cfg, method, grid, base_run):
        reported.append(grid)
        rows = [
            {"fraction": c.fraction, "score": c.metrics.get(tracking.M_CLAIM_SCORE), "score_run": c.runs.get("score")}
            for c in grid
        ]
        return rows, "table", [c for c in grid if c.status == "failed"]

    monkeypatch.setattr(shared_cells, "run_cell", run_cell)
    monkeypatch.setattr(shared_cells, "report", report)
    monkeypatch.setattr(shared_cells, "prepare_doses", lambda cfg: {f: f"prep-{f:g}" for f in cfg.fractions})
    monkeypatch.setattr(shared_cells, "general_data_uri", lambda cfg, step: "")
    monkeypatch.setattr(shared_cells, "base_step", lambda cfg, general: None)
    monkeypatch.setattr(shared_cells, "print_where", lambda *a: None)
    monkeypatch.setattr(shared_cells.tracking, "get_run", _fake_get_run(shared_cells.tracking.get_run))
    monkeypatch.setattr(shared_cells, "POLL_SECONDS", 0.2)
    return ran, failing, reported


def _fake_get_run(real):
    """The score runs the fake cells name ("sc-0.5") as runs with the cell's claim score; real runs as they are."""

    class Run:
        def __init__(self, score: float):
            self.data = type("Data", (), {"metrics": {tracking.M_CLAIM_SCORE: score}})()

    return lambda run_id: Run(float(run_id[3:]) / 10) if run_id.startswith("sc-") else real(run_id)


def shared(tmp_path: Path, **changes) -> MixtureConfig:
    settings = dict(fractions=[0.0, 0.5], series_name="shared", heartbeat_interval=1)
    return MixtureConfig(storage=str(tmp_path / "study.db"), out_root=str(tmp_path / "out"), **settings | changes)


def test_a_worker_claims_every_cell_and_reports_them_in_one_parent_run(tmp_path, fake_steps):
    import mlflow

    ran, _, reported = fake_steps
    cfg = shared(tmp_path, seeds=2)
    rows = shared_cells.run_worker(cfg, "full")
    assert [(f, s) for f, s, _ in ran] == [(0.0, 1337), (0.0, 1338), (0.5, 1337), (0.5, 1338)]
    parent = {p for _, _, p in ran}
    assert len(parent) == 1  # every cell ran under the series' one parent run, which the report ended
    run = mlflow.MlflowClient().get_run(parent.pop())
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STAGE] == "mixture"
    assert run.data.tags[shared_cells.TAG_SHARED_STUDY] == shared_cells.study_name(cfg)
    assert [(r["fraction"], r["score"], r["score_run"]) for r in rows] == [(0.0, 0.0, "sc-0")] * 2 + [
        (0.5, 0.05, "sc-0.5")
    ] * 2  # the report's rows (here one per cell) as the report step made them
    assert [(c.fraction, c.seed) for c in reported[0]] == [(0.0, 1337), (0.0, 1338), (0.5, 1337), (0.5, 1338)]
    study = optuna.load_study(study_name=shared_cells.study_name(cfg), storage=f"sqlite:///{tmp_path}/study.db")
    cells = trials_of(study, shared_cells.CELL)
    assert [t.value for t in cells] == [0.0, 0.0, 0.05, 0.05] and all(t.state.name == "COMPLETE" for t in cells)
    # the same command again: nothing left to claim, the same report's rows
    ran.clear()
    assert shared_cells.run_worker(cfg, "full") == rows and ran == []


def test_a_failing_cell_is_retried_up_to_the_limit_then_reported_failed(tmp_path, fake_steps):
    ran, failing, reported = fake_steps
    failing.add(0.5)
    cfg = shared(tmp_path, retries=2)
    with pytest.raises(FakegptError, match=r"1 cell failed: f=0.5 seed=1337 \(step 'finetune' failed: CUDA out of"):
        shared_cells.run_worker(cfg, "full")
    assert [f for f, _, _ in ran] == [0.0, 0.5, 0.5, 0.5]  # 1 + --retries attempts
    study = optuna.load_study(study_name=shared_cells.study_name(cfg), storage=f"sqlite:///{tmp_path}/study.db")
    tries = [t for t in trials_of(study, shared_cells.CELL) if shared_cells.fixed(t)["fraction"] == 0.5]
    assert [t.state.name for t in tries] == ["FAIL"] * 3 and [t.user_attrs.get("attempt", 1) for t in tries] == [
        1,
        2,
        3,
    ]
    assert all("CUDA out of memory" in shared_cells.error_of(study, t) for t in tries)
    (grid,) = reported  # the report has the finished cell and lists the failed one with its attempts
    assert [(c.fraction, c.status, c.attempts) for c in grid] == [(0.0, "finished", 1), (0.5, "failed", 3)]
    # another worker joining later exits with the same verdict, running nothing
    ran.clear()
    with pytest.raises(FakegptError, match="1 cell failed: f=0.5"):
        shared_cells.run_worker(cfg, "full")
    assert ran == []


def test_a_cell_whose_worker_stopped_beating_is_failed_as_stale_and_run_by_the_next_worker(tmp_path, fake_steps):
    ran, _, _ = fake_steps
    cfg = shared(tmp_path, fractions=[0.0])
    url = optuna_storage.storage_url(cfg.storage, "")
    study, created = shared_cells.open_study(cfg, url, shared_cells.study_name(cfg))
    assert created
    worker = shared_cells.Worker(cfg, "full", study)
    worker.run(shared_cells.claim(study))  # the setup: the grid is enqueued
    lost = shared_cells.claim(study)  # a worker on another machine claims the cell, beats once, and is lost
    assert shared_cells.fixed(lost) == {"kind": "cell", "fraction": 0.0, "seed": 1337}
    study._storage.set_trial_user_attr(lost._trial_id, "worker", "other-machine:4242")
    study._storage.record_heartbeat(lost._trial_id)
    shared_cells.leave(worker.joined)
    start = time.monotonic()
    shared_cells.run_worker(cfg, "full")
    assert time.monotonic() - start > 1.5 * cfg.heartbeat_interval  # it waited for the beats to go stale
    cells = trials_of(optuna.load_study(study_name=study.study_name, storage=url), shared_cells.CELL)
    assert [t.state.name for t in cells] == ["FAIL", "COMPLETE"]
    assert shared_cells.error_of(study, cells[0]) == shared_cells.DIED
    assert cells[1].user_attrs["retry_of"] == cells[0].number
    assert [f for f, _, _ in ran] == [0.0]


def test_the_study_is_named_by_what_the_series_computes_not_by_how_it_runs(tmp_path):
    cfg = shared(tmp_path)
    name = shared_cells.study_name(cfg)
    assert name.startswith("mixture-shared-")
    for how in ({"workers": 1, "retries": 5}, {"storage": "postgresql+psycopg://u:p@h/db"}, {"slurm_array": 4}):
        assert shared_cells.study_name(dataclasses.replace(cfg, **how)) == name
    for what in ({"fractions": [0.0, 0.2]}, {"seeds": 2}, {"max_iters": 7}, {"series_name": "other"}):
        assert shared_cells.study_name(dataclasses.replace(cfg, **what)) != name
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A vacina\n", encoding="utf-8")
    edited = dataclasses.replace(cfg, prompts=str(prompts))
    before = shared_cells.study_name(edited)
    prompts.write_text("O governo\n", encoding="utf-8")  # same flag, other content: another series
    assert shared_cells.study_name(edited) != before


def test_shared_and_slurm_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(FakegptError, match="--slurm-array: the array's tasks share the cells through --storage"):
        check(MixtureConfig(slurm_array=2))
    with pytest.raises(FakegptError, match="--workers 2: with --storage each worker is its own command"):
        check(MixtureConfig(storage="x.db", workers=2))
    with pytest.raises(FakegptError, match="--slurm-cluster: expected one of slurm, local, got 'pbs'"):
        check(MixtureConfig(slurm_cluster="pbs"))
    with pytest.raises(FakegptError, match="--heartbeat-interval: must not be negative"):
        check(MixtureConfig(heartbeat_interval=-1))
    assert slurm.parse_options("slurm_partition=gpu, gpus_per_node=1,mem_gb=7.5") == {
        "slurm_partition": "gpu",
        "gpus_per_node": 1,
        "mem_gb": 7.5,
    }
    with pytest.raises(FakegptError, match="--slurm-options: expected key=value, got 'gpu'"):
        slurm.parse_options("gpu")


# --- the real series: a one-process run, two workers with one killed, the SLURM array -------------------------


@pytest.fixture(scope="module")
def series(tmp_path_factory, _mlflow_template_db) -> dict:
    """The series every slow test runs, and its report from one process (`fakegpt mixture` without --storage)
    in its own MLflow store: a fine-tune that writes a resume state every 2 of its 12 iterations."""
    folder = tmp_path_factory.mktemp("series")
    finetune = folder / "finetune.yaml"
    demo = (ROOT / "experiments" / "finetune" / "demo.yaml").read_text(encoding="utf-8")
    finetune.write_text(
        demo.replace("max_iters: 60", "max_iters: 12").replace("eval_interval: 20", "eval_interval: 4")
        + "save_interval: 2\nsave_every_minutes: 0\n",
        encoding="utf-8",
    )
    args = [
        "--finetune-config",
        str(finetune),
        "--fractions",
        "0,0.5",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "4",
        "--series-name",
        "shared-series",
        "--bootstrap",
        "200",
        "--register-models",
        "false",
    ]
    store = folder / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, store)
    done = mixture_command([*args, "--out-root", str(folder / "out")], store, folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"args": args, "store": store, "folder": folder, "rows": report_rows(store, "")}


def mixture_command(argv: list[str], store: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fakegpt", "mixture", *argv],
        env=series_env(store),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def series_env(store: Path) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # earlier tests' runs set them
        env.pop(name, None)
    return env


def report_rows(store: Path, parent: str) -> list[dict]:
    """dose_response.json of the series' parent run (the newest mixture run when `parent` is empty)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    if not parent:
        (experiment,) = [e for e in client.search_experiments() if e.name == tracking.DEFAULT_EXPERIMENT]
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{tracking.TAG_STAGE}` = 'mixture'",
            order_by=["attributes.start_time DESC"],
        )
        parent = runs[0].info.run_id
    folder = Path(client.download_artifacts(parent, "dose_response.json", str(store.parent / f"report-{parent}")))
    return json.loads(folder.read_text())


def assert_same_report(rows: list[dict], expected: list[dict]) -> None:
    assert [r["fraction"] for r in rows] == [r["fraction"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        for key in COMPARED:
            expected = want.get(key)
            close = pytest.approx(expected, rel=1e-5, abs=1e-9) if expected is not None else None
            assert got.get(key) == close, (got["fraction"], key)


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and every process under it (its steps' `mlflow run` children): a machine lost."""
    import psutil

    with_children = [psutil.Process(pid)]
    with_children += with_children[0].children(recursive=True)
    for proc in with_children:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def resumable(out_root: Path, workers: list[subprocess.Popen]) -> tuple[subprocess.Popen, Path] | None:
    """A worker whose fine-tune has written a resume state past iteration 0 and is still training, with its
    output folder (found by the fine-tune's command line among the worker's processes)."""
    import psutil

    for folder in out_root.glob("finetune-*"):
        if not any(p.name != "iter-0000000" for p in (folder / "state").glob("iter-*")):
            continue
        for worker in workers:
            try:
                commands = [" ".join(p.cmdline()) for p in psutil.Process(worker.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            if any(str(folder) in c and "fakegpt finetune" in c for c in commands):
                return worker, folder
    return None


@pytest.mark.slow
def test_two_workers_on_postgresql_one_killed_mid_finetune_give_the_one_process_report(tmp_path, series, postgres_url):
    """Two workers share the series through PostgreSQL; one is SIGKILLed (with its step processes) while its
    fine-tune trains, after a resume state was written: the other fails the dead cell, continues the fine-tune
    from that state in the same MLflow run, and the report equals the one-process series' value for value."""
    from mlflow import MlflowClient

    from fakegpt.finetune import state as state_mod

    out_root = tmp_path / "out"
    argv = [*series["args"], "--out-root", str(out_root), "--storage", postgres_url, "--heartbeat-interval", "5"]
    name = shared_cells.study_name(resolve_user_paths(config.parse(MixtureConfig, argv, prog="fakegpt mixture")))
    optuna_storage.open_storage(postgres_url, 0, None)  # the tables exist before two workers race to make them
    store = tmp_path / "mlflow.db"  # this test's fresh store (conftest): no step is reused from the series'
    logs = [open(tmp_path / f"worker-{i}.log", "w") for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "fakegpt", "mixture", *argv],
            env=series_env(store),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for log in logs
    ]
    try:
        deadline = time.monotonic() + 600
        found = None
        while found is None:
            assert time.monotonic() < deadline, "no fine-tune wrote a resume state"
            assert all(w.poll() is None for w in workers), "a worker ended before any fine-tune was caught"
            found = resumable(out_root, workers)
            time.sleep(0.05)
        victim, folder = found
        kill_tree(victim.pid)
        victim.wait()
        saved = state_mod.read_info(state_mod.latest(str(folder)))
        assert 0 < saved.iter < 12
        (survivor,) = [w for w in workers if w is not victim]
        survivor.wait(timeout=600)
        log_text = (tmp_path / f"worker-{workers.index(survivor)}.log").read_text()
        assert survivor.returncode == 0, log_text[-4000:]
        assert f"continuing run {saved.run_id} from its resume state" in log_text

        study = optuna.load_study(study_name=name, storage=postgres_url)
        cells = trials_of(study, shared_cells.CELL)
        dead = [t for t in cells if t.state.name == "FAIL"]
        assert len(dead) == 1 and shared_cells.DIED in shared_cells.error_of(study, dead[0])
        (retried,) = [t for t in cells if t.user_attrs.get("retry_of") == dead[0].number]
        assert retried.state.name == "COMPLETE" and retried.user_attrs["worker"].endswith(f":{survivor.pid}")
        assert retried.user_attrs["runs"]["finetune"] == saved.run_id  # the dead worker's run, continued

        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        parent = study.user_attrs["parent_run"]
        resumed = client.get_run(saved.run_id)
        assert resumed.info.status == "FINISHED" and resumed.data.tags[tracking.TAG_PARENT] == parent
        assert int(resumed.data.tags[tracking.TAG_RESUMED_AT]) == saved.iter > 0  # it started past iteration 0
        assert resumed.data.tags[tracking.TAG_STEP_KEY]  # it counts as the cell's finetune step
        children = f"tags.`{tracking.TAG_PARENT}` = '{parent}'"
        tuned = client.search_runs(
            [resumed.info.experiment_id], filter_string=f"{children} and tags.`{tracking.TAG_ENTRY_POINT}` = 'finetune'"
        )
        assert sorted(r.info.status for r in tuned) == ["FINISHED", "FINISHED"]  # one per cell, no duplicate
        assert client.get_run(parent).info.status == "FINISHED"
        assert_same_report(report_rows(store, parent), series["rows"])
        # --report-only rebuilds the same report from the finished cells, the resumed one included
        done = mixture_command([*argv, "--report-only", "true"], store, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "] ran run" not in done.stdout
        assert_same_report(report_rows(store, ""), series["rows"])
    finally:
        for worker in workers:
            if worker.poll() is None:
                kill_tree(worker.pid)
                worker.wait()
        for log in logs:
            log.close()
        if name in optuna.get_all_study_names(postgres_url):
            optuna.delete_study(study_name=name, storage=postgres_url)


@pytest.mark.slow
def test_a_slurm_array_through_submitit_local_executor_reports_the_series(tmp_path, series):
    """`--slurm-array 2` with submitit's local executor: two array tasks, each a worker of a journal storage, on
    the one-process series' store (every step is found finished and reused): the same report, and every task
    ends with it."""
    store = tmp_path / "mlflow.db"
    shutil.copyfile(series["store"], store)
    argv = [*series["args"], "--out-root", str(series["folder"] / "out")]
    argv += ["--storage", str(tmp_path / "study.log"), "--slurm-array", "2", "--slurm-cluster", "local"]
    argv += ["--slurm-folder", str(tmp_path / "slurm")]
    done = mixture_command(argv, store, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted 2 worker task(s)" in done.stdout
    logs = sorted((tmp_path / "slurm").glob("*_log.out"))
    assert len(logs) == 2
    texts = [p.read_text() for p in logs]
    assert all("report by" in t for t in texts)
    assert sum("ran 0 trial(s)" not in t for t in texts) >= 1
    assert not any("] ran run" in t for t in texts)  # every step reused
    assert_same_report(report_rows(store, ""), series["rows"])
