"""A series' cells: retried after a failure (finished steps reused), failed with the reason after the retry
limit, found without running anything for a report."""

from __future__ import annotations

import pytest

from fakegpt.errors import FakegptError
from fakegpt.studies import cells
from fakegpt.studies import steps as steps_module
from fakegpt.studies.cells import CellJob, cell_finetune_params, run_cell, run_cells
from fakegpt.studies.mixture import MixtureConfig


class FakeRun:
    def __init__(self, metrics):
        self.data = type("Data", (), {"metrics": metrics})()


@pytest.fixture
def steps(monkeypatch):
    """Steps that record what ran and fail the first `failures[name]` times they are asked to run."""
    ran: list[str] = []
    failures: dict[str, int] = {}

    def run_step(project_dir, name, params, env_manager, reuse="true"):
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            raise FakegptError(f"step {name!r} failed: out of memory")
        ran.append(name)
        return f"run-{name}-{len(ran)}", False

    monkeypatch.setattr(steps_module, "run_step", run_step)  # what run_or_find runs
    monkeypatch.setattr(cells.tracking, "update_run", lambda *a, **k: None)
    monkeypatch.setattr(cells.tracking, "get_run", lambda run_id: FakeRun({"claim/score": 0.25}))
    return ran, failures


def job(seed: int = 1338) -> CellJob:
    return CellJob(0.5, seed, False, "prep", "", "full", "", "dose-50")


def test_a_cell_that_fails_once_is_retried_and_finishes(steps):
    ran, failures = steps
    failures["sample"] = 1
    cell = run_cell(MixtureConfig(retries=1, seeds=2), job())
    assert (cell.status, cell.attempts, cell.error) == ("finished", 2, "")
    assert cell.metrics == {"claim/score": 0.25}
    assert set(cell.runs) == {"prepare", "finetune", "sample", "score"}


def test_a_cell_that_keeps_failing_is_failed_with_its_reason_after_the_retry_limit(steps):
    ran, failures = steps
    failures["finetune"] = 5
    cell = run_cell(MixtureConfig(retries=2), job())
    assert (cell.status, cell.attempts) == ("failed", 3)
    assert cell.error == "step 'finetune' failed: out of memory"
    assert ran == []  # nothing after the failing step ran


def test_a_report_only_finds_runs_and_never_runs_a_step(steps, monkeypatch):
    ran, _ = steps
    found = {"finetune": "ft", "sample": "sa"}  # the score step has not run yet
    monkeypatch.setattr(steps_module, "find_step", lambda project_dir, name, params: found.get(name))
    cell = run_cell(MixtureConfig(), job(), lookup=True)
    assert cell.status == "missing" and cell.runs == {"prepare": "prep", "finetune": "ft", "sample": "sa"}
    found["score"] = "sc"
    assert run_cell(MixtureConfig(), job(), lookup=True).status == "finished"
    assert ran == []


def test_workers_and_retries_are_checked_before_anything_runs():
    from fakegpt.studies.mixture import check

    with pytest.raises(FakegptError, match="--workers: must be at least 1"):
        check(MixtureConfig(workers=0))
    with pytest.raises(FakegptError, match="--retries: must not be negative"):
        check(MixtureConfig(retries=-1))


def test_a_cell_of_several_gpus_runs_its_finetune_on_that_many_processes(monkeypatch):
    """--gpus-per-cell G: the cell's finetune step is given --nproc-per-node G (only when G > 1, so a one-GPU
    cell keeps its step key); a machine short of workers x G GPUs is refused before any cell runs; the
    accumulation must split across G processes."""
    from fakegpt.studies.mixture import check

    assert "nproc_per_node" not in cell_finetune_params(MixtureConfig(), job())
    assert cell_finetune_params(MixtureConfig(gpus_per_cell=4), job())["nproc_per_node"] == 4
    monkeypatch.setattr(cells, "gpu_count", lambda device: 4)
    monkeypatch.setattr(cells, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    with pytest.raises(FakegptError, match="--workers 2 --gpus-per-cell 4: 8 GPUs are needed and this machine has 4"):
        run_cells(MixtureConfig(workers=2, gpus_per_cell=4), [job(), job(1339)], "parent")
    with pytest.raises(FakegptError, match="--workers 1 --gpus-per-cell 8: 8 GPUs are needed"):
        run_cells(MixtureConfig(gpus_per_cell=8), [job()], "parent")
    with pytest.raises(FakegptError, match="--gpus-per-cell: must be at least 1"):
        check(MixtureConfig(gpus_per_cell=0))
    # experiments/finetune/demo.yaml accumulates 2 micro-batches: 3 processes cannot share them
    with pytest.raises(FakegptError, match="--gpus-per-cell 3: the fine-tune's gradient_accumulation_steps 2"):
        check(MixtureConfig(gpus_per_cell=3, finetune_config="experiments/finetune/demo.yaml"))
    check(MixtureConfig(gpus_per_cell=2, finetune_config="experiments/finetune/demo.yaml"))


def test_with_workers_a_doses_cells_are_handed_on_before_the_next_dose_is_prepared(monkeypatch):
    """--workers: the cells of the first dose can start while the second dose is prepared."""
    from fakegpt.studies import mixture

    events: list[str] = []

    def prepare_dose(cfg, fraction, lookup=False):
        events.append(f"prepare {fraction:g}")
        return f"prep-{fraction:g}"

    monkeypatch.setattr(mixture, "prepare_dose", prepare_dose)
    cfg = MixtureConfig(fractions=[0.0, 0.5], seeds=2, workers=2, finetune_config="experiments/finetune/demo.yaml")
    prepared: dict[float, str | None] = {}
    for j in mixture.prepared_jobs(cfg, "full", "", prepared):
        events.append(f"cell {j.fraction:g} {j.seed} {j.prepare_run}")
    seeds = mixture.seed_list(cfg)
    assert events == [
        "prepare 0",
        f"cell 0 {seeds[0]} prep-0",
        f"cell 0 {seeds[1]} prep-0",
        "prepare 0.5",
        f"cell 0.5 {seeds[0]} prep-0.5",
        f"cell 0.5 {seeds[1]} prep-0.5",
    ]
    assert prepared == {0.0: "prep-0", 0.5: "prep-0.5"}
    # and the jobs are those of the one-process series, in the same order
    assert list(mixture.prepared_jobs(cfg, "full", "", {})) == mixture.cell_jobs(cfg, "full", prepared, "")
