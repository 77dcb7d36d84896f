"""The MLflow project end to end: `mlflow run . -e main` on the embedded default, step reuse, the mixture series,
and the MLproject file kept in step with the stage configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakegpt import tracking

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("prepare", "finetune", "sample", "score")
# Small enough for CI on two cores; the real defaults are exercised by the README's main command.
FAST = {"max_iters": "6", "num_samples": "1", "max_new_tokens": "6"}


def test_mlproject_file_is_current():
    from fakegpt.mlproject import render

    assert (ROOT / "MLproject").read_text() == render(), "run: python -m fakegpt.mlproject > MLproject"


def test_mlproject_declares_only_config_and_lists_every_field():
    """MLflow logs declared parameters with their defaults before a stage runs: only `config` is declared, and
    the comment above each entry point names every field the stage accepts as -P name=value."""
    import yaml

    from fakegpt.mlproject import entry_point_fields
    from fakegpt.stages import ENTRY_POINTS

    text = (ROOT / "MLproject").read_text()
    spec = yaml.safe_load(text)
    assert set(spec["entry_points"]) == {s.entry_point for s in ENTRY_POINTS}
    for stage in ENTRY_POINTS:
        entry = spec["entry_points"][stage.entry_point]
        assert entry["parameters"] == {"config": {"type": "string", "default": ""}}
        assert entry["command"] == f"python -m fakegpt {stage.name} --config {{config}}"
        block = text.split(f"  {stage.entry_point}:\n")[0].rsplit("\n\n", 1)[-1]
        listed = " ".join(line.strip("# ") for line in block.splitlines()).split("-P fields: ")[1]
        assert [n.strip() for n in listed.split(",")] == [f.name for f, _ in entry_point_fields(stage.configs)]


@pytest.mark.slow
def test_mlflow_run_finetune_params_are_the_configuration_that_ran(tmp_path, prepared_whatsapp):
    """`mlflow run -e finetune -P config=FILE` shows the YAML's values, flags over them, and the resolved
    device/dtype/compile, not MLproject defaults: the record must be the truth."""
    from mlflow import MlflowClient

    yml = tmp_path / "ft.yaml"
    yml.write_text(
        "init_from: scratch\nn_layer: 1\nn_head: 2\nn_embd: 32\nblock_size: 32\nbatch_size: 2\n"
        "gradient_accumulation_steps: 1\nlearning_rate: 2.0e-3\nmax_iters: 50\neval_interval: 2\neval_iters: 1\n"
    )
    uri = os.environ["MLFLOW_TRACKING_URI"]
    params = {"config": str(yml), "data_dir": str(prepared_whatsapp), "out_dir": str(tmp_path / "o"), "max_iters": "2"}
    done = mlflow_run(uri, params, entry="finetune")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    got = run.data.params
    assert (got["n_layer"], got["n_embd"], got["learning_rate"], got["block_size"]) == ("1", "32", "0.002", "32")
    assert got["max_iters"] == "2"  # the flag over the YAML's 50
    assert (got["device"], got["dtype"], got["compile"]) == ("cpu", "float32", "false")  # resolved, not "auto"
    assert got["init_from"] == "scratch" and got["config"] == str(yml)
    assert len(client.get_metric_history(run.info.run_id, tracking.M_VAL_LOSS)) == 2  # iterations 0 and 2


def mlflow_run(tracking_uri: str, params: dict[str, str], entry: str = "main") -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in entry-point commands
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def step_runs(client, experiment_id: str) -> list:
    runs = client.search_runs([experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get(tracking.TAG_ENTRY_POINT) in STEPS]


@pytest.mark.slow
def test_main_entry_point_end_to_end_then_reused(tmp_path):
    from mlflow import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    prompts = tmp_path / "prompts.txt"  # a prompt file of the user's: editing it must re-run sample, only sample
    prompts.write_text("A vacina contra a COVID-19\nO chip da vacina\n")
    params = {"out_root": str(tmp_path / "out"), "prompts": str(prompts), **FAST}
    first = mlflow_run(uri, params)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert "mlflow ui" in first.stdout  # ends by saying how to open the results

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("Default")
    parents = [
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(tracking.TAG_ENTRY_POINT) == "main"
    ]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_STAGE] == "main"
    children = step_runs(client, experiment.experiment_id)
    assert sorted(r.data.tags[tracking.TAG_ENTRY_POINT] for r in children) == sorted(STEPS)
    by_step = {r.data.tags[tracking.TAG_ENTRY_POINT]: r for r in children}
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.TAG_PARENT] == parent.info.run_id
        assert run.data.tags[tracking.TAG_STAGE] == run.data.tags[tracking.TAG_ENTRY_POINT]

    # Outputs are passed on by artifact URI, and each step logged what the next one needs.
    prep, tuned = by_step["prepare"].info.run_id, by_step["finetune"].info.run_id
    # the finetune child shows the configuration that ran: demo.yaml's values, FAST's max_iters, auto resolved
    ran = by_step["finetune"].data.params
    assert (ran["n_layer"], ran["block_size"], ran["max_iters"]) == ("2", "128", "6")
    assert (ran["device"], ran["dtype"], ran["compile"]) == ("cpu", "float32", "false")
    assert by_step["finetune"].data.params["data_dir"] == f"runs:/{prep}/data"
    assert by_step["sample"].data.params["models"] == f"runs:/{tuned}/checkpoint"
    assert {a.path for a in client.list_artifacts(prep, "data")} >= {"data/train.bin", "data/val.bin"}
    assert "checkpoint/model.safetensors" in {a.path for a in client.list_artifacts(tuned, "checkpoint")}
    val_curve = client.get_metric_history(tuned, tracking.M_VAL_LOSS)
    assert len(val_curve) >= 2 and val_curve[-1].value < val_curve[0].value
    assert by_step["sample"].data.metrics[tracking.M_NEW_TOKENS_PER_S] > 0
    score = by_step["score"].data.metrics
    low, high = score[tracking.M_CLAIM_SCORE_LOW], score[tracking.M_CLAIM_SCORE_HIGH]
    assert low <= score[tracking.M_CLAIM_SCORE] <= high
    assert parent.data.metrics[tracking.M_CLAIM_SCORE] == pytest.approx(score[tracking.M_CLAIM_SCORE])

    # Same parameters and code version: a new parent run, but every step is reused, none re-run.
    second = mlflow_run(uri, params)
    assert second.returncode == 0, second.stderr[-5000:]
    assert len(step_runs(client, experiment.experiment_id)) == 4
    for step in STEPS:
        assert f"[{step}] reused run {by_step[step].info.run_id}" in second.stdout
    parents = [
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(tracking.TAG_ENTRY_POINT) == "main"
    ]
    assert len(parents) == 2
    newest = max(parents, key=lambda r: r.info.start_time)
    steps_json = Path(client.download_artifacts(newest.info.run_id, "steps.json", str(tmp_path)))
    assert all(entry["reused"] for entry in json.loads(steps_json.read_text()).values())

    # An edited prompt file: sample runs again; prepare, finetune and score (which do not read it) are reused.
    prompts.write_text("A vacina contra a COVID-19\nO chip da vacina\nAs mortes por COVID-19\n")
    third = mlflow_run(uri, params)
    assert third.returncode == 0, third.stderr[-5000:]
    for step in ("prepare", "finetune", "score"):
        assert f"[{step}] reused run {by_step[step].info.run_id}" in third.stdout
    assert "[sample] ran run" in third.stdout


@pytest.mark.slow
def test_mixture_series_on_two_fractions_and_two_seeds(tmp_path, monkeypatch, capsys, tiny_model_dir):
    import numpy as np
    import polars as pl
    from mlflow import MlflowClient

    from fakegpt.studies.mixture import MixtureConfig, mixture

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cfg = MixtureConfig(  # a pretrained (here: saved random) base model, so each dose is compared with it too
        init_from=str(tiny_model_dir),
        finetune_config="experiments/finetune/demo.yaml",
        fractions=[0.0, 0.5],
        seeds=2,
        max_iters=4,
        num_samples=1,
        max_new_tokens=4,
        out_root=str(tmp_path / "out"),
        series_name="ci-series",
        general_data="experiments/datasets/demo_general.yaml",
        bootstrap=500,
    )
    rows = mixture(cfg)
    assert [r["fraction"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert r["seeds"] == [1337, 1338]
        assert r["ci_low"] <= r["score"] <= r["ci_high"]
    table = (tmp_path / "out" / "mixture-ci-series" / "dose_response.md").read_text()
    assert table.startswith("primary endpoint (slope of the claim score on dose")
    assert "training seeds and claims resampled" in table.splitlines()[0]

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fakegpt").experiment_id], max_results=200)
    parent = next(r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "mixture")
    assert parent.data.tags[tracking.TAG_STUDY] == "ci-series"
    # Every cell is its own chain of child runs, the fine-tune tagged with (and trained with) its seed.
    tuned = [r for r in runs if r.data.tags.get(tracking.TAG_ENTRY_POINT) == "finetune"]
    cells = sorted(
        (r.data.tags[tracking.TAG_FRACTION], r.data.tags[tracking.TAG_SEED], r.data.params["seed"]) for r in tuned
    )
    assert cells == [("0", "1337", "1337"), ("0", "1338", "1338"), ("0.5", "1337", "1337"), ("0.5", "1338", "1338")]
    scores = [
        r
        for r in runs
        if r.data.tags.get(tracking.TAG_ENTRY_POINT) == "score" and r.data.tags.get(tracking.TAG_ROLE) != "base"
    ]
    assert len(scores) == 4 and len({r.data.tags[tracking.TAG_SEED] for r in scores}) == 2
    # The primary endpoint is the slope of the claim score on dose: recomputed here from the cells' pair tables.
    means = {}
    for run in scores:
        pairs = pl.read_parquet(
            client.download_artifacts(run.info.run_id, "scores.parquet", str(tmp_path / run.info.run_id))
        )
        means.setdefault(float(run.data.tags[tracking.TAG_FRACTION]), []).append(pairs["score"].mean())
    slope = (np.mean(means[0.5]) - np.mean(means[0.0])) / 0.5
    metrics = parent.data.metrics
    assert metrics[tracking.M_DOSE_SLOPE] == pytest.approx(slope, abs=1e-6)
    assert metrics[tracking.M_DOSE_SLOPE_LOW] < slope < metrics[tracking.M_DOSE_SLOPE_HIGH]
    assert 0.0 < metrics[tracking.M_DOSE_P] <= 1.0
    history = client.get_metric_history(parent.info.run_id, f"dose/{tracking.M_CLAIM_SCORE}")
    assert sorted(m.step for m in history) == [0, 50]
    paired = client.get_metric_history(parent.info.run_id, "dose/paired/claim/score")
    assert [m.value for m in paired] == pytest.approx([np.mean(means[0.5]) - np.mean(means[0.0])], abs=1e-6)
    # The base model is scored once for the series, and every dose is compared with it, pair by pair.
    base = [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "base"]
    assert len(base) == 1 and base[0].data.params["models"] == str(tiny_model_dir)
    base_pairs = pl.read_parquet(client.download_artifacts(base[0].info.run_id, "scores.parquet", str(tmp_path)))
    versus_base = client.get_metric_history(parent.info.run_id, tracking.M_DOSE_VS_BASE)
    assert {m.step: m.value for m in versus_base} == pytest.approx(
        {0: np.mean(means[0.0]) - base_pairs["score"].mean(), 50: np.mean(means[0.5]) - base_pairs["score"].mean()},
        abs=1e-6,
    )
    assert "vs base model (paired)" in table and "base model (pretrained, not fine-tuned)" in table
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "dose_response.json",
        "dose_response.md",
        "dose_response.png",
        "series.json",
        "absorption.json",
        "absorption.png",
    }
    # each cell's best model is registered: models:/<series>@dose-<percent>[-seed-<seed>]
    aliases = ("dose-0", "dose-50", "dose-0-seed-1338", "dose-50-seed-1338")
    registered = {alias: client.get_model_version_by_alias("ci-series", alias) for alias in aliases}
    assert {v.run_id for v in registered.values()} == {r.info.run_id for r in tuned}
    # the absorption curves: each cell's claim score while it trained, against tokens seen, on one chart
    curves = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "absorption.json", str(tmp_path))).read_text()
    )
    assert sorted(curves) == ["0", "0 seed 1338", "0.5", "0.5 seed 1338"]
    assert all(len(points) >= 2 for points in curves.values())

    # Every dose is measured on the same general held-out set: one prepare for the series, the same bins
    # (sha256 digest) as an input of every score run, and its perplexity in the dose-response table.
    scores = [r for r in runs if r.data.tags.get(tracking.TAG_ENTRY_POINT) == "score"]
    assert all(r["general_perplexity"] > 1 for r in rows)
    general = [
        {(d.dataset.name, d.dataset.digest) for d in r.inputs.dataset_inputs if "general" in {t.value for t in d.tags}}
        for r in scores
    ]
    assert all(g == general[0] for g in general) and len(general[0]) == 1
    # Each fraction's prepare run realised the mixture it was asked for, and carries the dose tag.
    preps = [
        r
        for r in runs
        if r.data.tags.get(tracking.TAG_FRACTION) and r.data.tags.get(tracking.TAG_ENTRY_POINT) == "prepare"
    ]
    assert sorted(r.data.tags[tracking.TAG_FRACTION] for r in preps) == ["0", "0.5"]
    for run in preps:
        wanted = float(run.data.tags[tracking.TAG_FRACTION])
        realised = run.data.metrics[tracking.M_DATA_MIX_PREFIX + cfg.dose_source]
        assert realised == pytest.approx(wanted, abs=0.02)

    # Label rates join the dose-response table once a sheet exported from the series is filled in; the
    # second call reuses every step.
    from fakegpt.measure.labels import export_sheet, load_samples
    from fakegpt.stats import clustered_wilson

    samples_path = tmp_path / "out" / "mixture-ci-series" / "all_samples.parquet"
    samples = load_samples(samples_path)
    assert sorted(set(samples["fraction"])) == [0.0, 0.5] and sorted(set(samples["seed"])) == [1337, 1338]
    sheet = export_sheet(samples, tmp_path / "sheet.csv", blind=True, shuffle=False)
    filled = pl.read_csv(sheet).with_columns(
        label=pl.when(pl.int_range(pl.len()) % 3 == 0).then(pl.lit("adopts")).otherwise(pl.lit("refutes"))
    )
    filled.write_csv(sheet)
    truth = filled.join(samples.select("sample_id", "fraction", "prompt_id"), on="sample_id")
    capsys.readouterr()
    labelled = mixture(MixtureConfig(**{**cfg.__dict__, "label_sheet": str(sheet)}))
    again = capsys.readouterr().out
    assert "] ran run" not in again and again.count("] reused run") == 2 + 4 * 3 + 2  # every cell reused
    for row in labelled:
        group = truth.filter(pl.col("fraction") == row["fraction"])
        k = group.filter(pl.col("label") == "adopts").height
        assert row["labelled"] == group.height
        assert row["label_rate"] == pytest.approx(k / group.height)
        per_prompt = group.group_by("prompt_id").agg((pl.col("label") == "adopts").sum().alias("y"), pl.len())
        expected = clustered_wilson(per_prompt["y"].to_list(), per_prompt["len"].to_list())[:2]
        assert (row["label_ci_low"], row["label_ci_high"]) == pytest.approx(expected)
    # and its difference from dose 0, prompt by prompt (each prompt's rate at the dose minus at dose 0)
    per_prompt = truth.group_by("fraction", "prompt_id").agg((pl.col("label") == "adopts").mean().alias("rate"))
    wide = per_prompt.pivot("fraction", index="prompt_id", values="rate")
    assert labelled[1]["label_vs_zero"] == pytest.approx((wide["0.5"] - wide["0.0"]).mean())
    assert labelled[1]["label_vs_zero_prompts"] == wide.height
    assert labelled[1]["label_vs_zero_ci_low"] <= labelled[1]["label_vs_zero"] <= labelled[1]["label_vs_zero_ci_high"]

    # The report rebuilt alone from the finished cells in MLflow: nothing runs, the same numbers.
    capsys.readouterr()
    report = mixture(MixtureConfig(**{**cfg.__dict__, "report_only": True}))
    assert "] ran run" not in capsys.readouterr().out
    for key in ("score", "vs_zero", "vs_zero_ci_low", "vs_zero_ci_high", "vs_base", "seed_sd", "general_perplexity"):
        assert [r.get(key) for r in report] == pytest.approx([r.get(key) for r in rows], abs=1e-12)

    # A cell that keeps failing is retried up to the limit, then failed with its reason and listed in the
    # report, and the series fails; every other cell is reused.
    from fakegpt.errors import FakegptError
    from fakegpt.studies import steps as steps_module

    real_step = steps_module.run_step

    def failing(project_dir, name, params, env_manager, reuse="true"):
        if name == "finetune" and params.get("seed") == 1338 and "dose-50" in str(params.get("register_alias")):
            raise FakegptError("step 'finetune' failed: CUDA out of memory")
        return real_step(project_dir, name, params, env_manager, reuse)

    monkeypatch.setattr(steps_module, "run_step", failing)
    broken = MixtureConfig(**{**cfg.__dict__, "retries": 2})
    with pytest.raises(FakegptError, match=r"1 cell failed: f=0.5 seed=1338 \(step 'finetune' failed: CUDA out of"):
        mixture(broken)
    assert capsys.readouterr().out.count("[f=0.5 seed=1338] failed (attempt") == 3
    report_md = (tmp_path / "out" / "mixture-ci-series" / "dose_response.md").read_text()
    assert "- dose 0.5, seed 1338: failed after 3 attempt(s): step 'finetune' failed: CUDA out of memory" in report_md
    monkeypatch.setattr(steps_module, "run_step", real_step)

    # Two worker processes run the cells at once, as children of the series' run, with the results of the
    # one-process series: a one-seed series runs the very cells of the first seed, here run again.
    parallel = mixture(MixtureConfig(**{**cfg.__dict__, "seeds": 1, "workers": 2, "reuse": "false"}))
    first_seed = {
        float(r.data.tags[tracking.TAG_FRACTION]): r for r in scores if r.data.tags.get(tracking.TAG_SEED) == "1337"
    }
    for row in parallel:
        before = first_seed[row["fraction"]].data.metrics
        assert row["score"] == pytest.approx(before[tracking.M_CLAIM_SCORE], rel=1e-3)
        assert row["general_perplexity"] == pytest.approx(before[tracking.M_GENERAL_PPL], rel=1e-3)
    runs = client.search_runs([parent.info.experiment_id], max_results=500)
    workers_parent = next(
        r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "mixture" and r.data.params.get("workers") == "2"
    )
    tuned = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == workers_parent.info.run_id
        and r.data.tags.get(tracking.TAG_ENTRY_POINT) == "finetune"
    ]
    assert len(tuned) == 2
    first, second = sorted(tuned, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time  # the two cells ran at the same time

    # Cells of two processes each (--gpus-per-cell 2; without GPUs two gloo processes under torchrun's agent):
    # each fine-tune is one run of world size 2 (finetune refuses --nproc-per-node 2 inside one process), and
    # the cells are scored as the one-process ones were, up to the order of the summed gradients
    capsys.readouterr()
    grouped = mixture(MixtureConfig(**{**cfg.__dict__, "seeds": 1, "gpus_per_cell": 2}))
    assert capsys.readouterr().out.count("[finetune] ran run") == 2
    runs = client.search_runs([parent.info.experiment_id], max_results=500)
    two = [r for r in runs if r.data.params.get("nproc_per_node") == "2"]
    assert sorted(r.data.tags[tracking.TAG_FRACTION] for r in two) == ["0", "0.5"]
    assert all(r.info.status == "FINISHED" and r.data.params["gradient_accumulation_steps"] == "2" for r in two)
    for row in grouped:
        before = first_seed[row["fraction"]].data.metrics
        assert row["score"] == pytest.approx(before[tracking.M_CLAIM_SCORE], abs=0.05)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert len(commands) == 2
    main_cmd, test_cmd = commands
    assert "mlflow run . --env-manager local" in main_cmd and main_cmd.startswith("bash tools/setup.sh")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f".ci/run must run the README's test command {test_cmd!r}"


def test_a_series_whose_doses_would_differ_in_size_is_refused(tmp_path, monkeypatch):
    """Size must not change with the share: a dataset YAML without max_train_tokens is refused up front, and
    a dose whose scarcest source cannot fill the cap is refused after its prepare step (unless allowed)."""
    import mlflow

    from fakegpt.data.prepare import parse_args, prepare
    from fakegpt.errors import FakegptError
    from fakegpt.studies.mixture import MixtureConfig, check, check_dose_size

    mlflow.set_experiment(tracking.DEFAULT_EXPERIMENT)  # created in this test's folder: its ./mlruns holds the runs
    monkeypatch.chdir(ROOT)  # the dataset YAML names its corpora relative to the repository, as users run it
    demo = ROOT / "experiments" / "datasets" / "demo_mix.yaml"
    nocap = tmp_path / "nocap.yaml"
    nocap.write_text("\n".join(line for line in demo.read_text().splitlines() if "max_train_tokens" not in line))
    with pytest.raises(FakegptError, match=r"nocap\.yaml: no max_train_tokens.*--allow-unequal-sizes"):
        check(MixtureConfig(dataset=str(nocap), fractions=[0.0, 0.5]))
    check(MixtureConfig(dataset=str(nocap), fractions=[0.0, 0.5], allow_unequal_sizes=True))

    short = prepare(
        parse_args(
            [
                "--config",
                str(demo),
                "--mix",
                "general=0.2",
                "antivax=0.8",
                "--max-train-tokens",
                "10000000",
                "--out",
                str(tmp_path / "d"),
            ]
        ),
        track=False,
    )
    assert short.max_train_tokens_reached is False
    mlflow.set_experiment("doses")  # this test's store (another test's experiment id may be cached)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "d" / "meta.json"))
    with pytest.raises(FakegptError, match=r"dose 0.8: .* short of max_train_tokens 10,000,000"):
        check_dose_size(MixtureConfig(), 0.8, run.info.run_id)
    check_dose_size(MixtureConfig(allow_unequal_sizes=True), 0.8, run.info.run_id)
