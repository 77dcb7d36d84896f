"""A chained step is reused only when everything it reads is the same: parameters, file contents, code state."""

from __future__ import annotations

import subprocess

import pytest

from fakegpt import tracking
from fakegpt.studies import steps


def git(repo, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def project(tmp_path, shared_data):
    """A git checkout holding a prompt file, two data files and a dataset YAML that names one of them."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "prompts.txt").write_text("A vacina\n")
    csv = (shared_data / "fakewhatsapp_br.csv").read_bytes()[:20_000]
    (repo / "data" / "a.csv").write_bytes(csv)
    (repo / "data" / "b.csv").write_bytes(csv[:10_000])
    (repo / "set.yaml").write_text("name: s\nsources:\n  - {name: a, path: data/a.csv, fraction: 1.0}\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return repo


def key(repo, **params: str) -> steps.StepKey:
    return steps.step_key("sample", params, repo, repo)


def test_same_inputs_same_key_and_outputs_do_not_count(project):
    first = key(project, prompts="prompts.txt", data="data/*.csv", out_dir="out/x")
    (project / "out" / "x").mkdir(parents=True)
    (project / "out" / "x" / "samples.parquet").write_bytes(b"written by the step itself")
    again = key(project, prompts="prompts.txt", data="data/*.csv", out_dir="out/x")
    assert again.key == first.key
    assert len(first.files) == 3 and first.code_state.endswith("+clean")


@pytest.mark.parametrize(
    "change",
    [
        lambda repo: (repo / "prompts.txt").write_text("A vacina causa\n"),  # an edited prompt file
        lambda repo: (repo / "data" / "c.csv").write_text("id,channel_id,date,message\n"),  # a new glob match
        lambda repo: (repo / "data" / "b.csv").write_bytes(b"id,channel_id,date,message\n1,2,2020-01-01,x\n"),
    ],
    ids=["edited-prompts", "new-file-in-glob", "edited-data-file"],
)
def test_an_input_file_change_changes_the_key(project, change):
    before = key(project, prompts="prompts.txt", data="data/*.csv")
    change(project)
    assert key(project, prompts="prompts.txt", data="data/*.csv").key != before.key


def test_files_named_inside_a_yaml_count(project):
    before = key(project, config="set.yaml")
    assert str((project / "data" / "a.csv").resolve()) in before.files
    (project / "data" / "a.csv").write_text("id,channel_id,date,message\n")
    assert key(project, config="set.yaml").key != before.key


def test_parameters_and_uncommitted_code_change_the_key(project):
    before = key(project, prompts="prompts.txt", temperatures="0.8")
    assert key(project, prompts="prompts.txt", temperatures="1.0").key != before.key
    (project / "set.yaml").write_text("name: edited\n")  # a tracked file, changed and not committed
    dirty = key(project, prompts="prompts.txt", temperatures="0.8")
    assert dirty.key != before.key and not dirty.code_state.endswith("+clean")
    assert dirty.code_state.split("+")[0] == before.code_state.split("+")[0]  # same commit


def test_outside_git_a_step_runs_unless_forced(tmp_path, monkeypatch):
    assert steps.code_state(tmp_path) is None
    ran, looked = [], []
    monkeypatch.setattr(steps, "find_finished_run", lambda tags: looked.append(tags) or "old-run")
    monkeypatch.setattr(steps, "run_entry_point", lambda *a: ran.append(a) or "new-run")
    monkeypatch.setattr(tracking, "update_run", lambda run_id, tags: None)
    assert steps.run_step(tmp_path, "score", {"claims": "c.yaml"}, "local", reuse="true") == ("new-run", False)
    assert not looked  # unknown code state: not even looked up
    assert steps.run_step(tmp_path, "score", {"claims": "c.yaml"}, "local", reuse="force") == ("old-run", True)
    assert looked[0][tracking.TAG_ENTRY_POINT] == "score" and len(looked[0][tracking.TAG_STEP_KEY]) == 64
    assert steps.run_step(tmp_path, "score", {}, "local", reuse="false") == ("new-run", False)
    with pytest.raises(Exception, match="--reuse: expected one of true, false, force"):
        steps.run_step(tmp_path, "score", {}, "local", reuse="maybe")
