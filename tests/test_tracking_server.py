"""The MLflow UI path for real: a tracking server on loopback, a stage logging to it over HTTP, runs read back.

Also: a server that is down gives a one-line error within seconds, and an artifact that cannot be logged
stays on disk with its path in the message.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fakegpt import tracking
from fakegpt.errors import FakegptError

pytestmark = pytest.mark.slow  # starts a real tracking server (tens of seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """An MLflow server on loopback storing in `folder` (on `port`: the same server again after a restart)."""
    port = port or free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder}/server.db",
            "--artifacts-destination",
            str(folder / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "a"),  # noqa: SIM115 - the server process owns it
        env=env,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    stop_server(proc)
    pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    import contextlib
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    proc, uri = start_server(folder)
    yield uri
    stop_server(proc)


def run_cli(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "fakegpt", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_stage_logs_to_server_and_reads_back_over_http(server, shared_data, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "bins"
    proc = run_cli(
        ["prepare", str(shared_data / "fakewhatsapp_br-naive.csv"), "--out", str(out)],
        {"MLFLOW_TRACKING_URI": server, "MLFLOW_EXPERIMENT_NAME": "server-test"},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("server-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_STAGE] == "prepare"
    assert run.data.metrics, "prepare logged no metrics"
    import json

    meta = json.loads((out / "meta.json").read_text())
    assert any(v == meta["train_tokens"] for v in run.data.metrics.values())
    # The artifact travels over HTTP through the server's artifact proxy.
    local = client.download_artifacts(run.info.run_id, "meta.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["train_tokens"] == meta["train_tokens"]


def test_unreachable_server_fails_fast_with_one_line(shared_data, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_cli(
        ["prepare", str(shared_data / "fakewhatsapp_br-naive.csv"), "--out", str(tmp_path / "bins")],
        {"MLFLOW_TRACKING_URI": dead},
        tmp_path,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unreachable" in lines[0] and dead in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s to report a dead server"


def test_artifact_kept_on_disk_when_server_dies(tmp_path, monkeypatch):
    folder = tmp_path / "srv"
    folder.mkdir()
    proc, uri = start_server(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = tmp_path / "result.txt"
    result.write_text("finished work\n")
    try:
        with pytest.raises(FakegptError) as err, tracking.run(stage="test", run_name="dies"):
            stop_server(proc)
            tracking.log_artifact(result)
    finally:
        stop_server(proc)
    assert str(result) in str(err.value)
    assert result.read_text() == "finished work\n"


@pytest.mark.slow
def test_finetune_survives_server_restart_and_every_metric_arrives(prepared_whatsapp, tmp_path, monkeypatch):
    """The tracking server dies mid-run and comes back: training goes on, and every metric point reaches it."""
    import torch
    from mlflow import MlflowClient
    from tiny_runs import tiny_config

    from fakegpt.finetune.train import METRICS_FILE, finetune

    folder = tmp_path / "srv"
    folder.mkdir()
    proc, uri = start_server(folder)
    port = int(uri.rsplit(":", 1)[1])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    procs = [proc]
    down_at: list[int] = []

    def outage(ev) -> None:
        if ev.iter == 4:  # the server dies; training goes on without it for 8 iterations
            stop_server(procs[-1])
            down_at.append(ev.iter)
        elif ev.iter == 12:  # ... and comes back on the same address with the same store
            procs.append(start_server(folder, port)[0])

    cfg = tiny_config(prepared_whatsapp, tmp_path / "out", max_iters=16, eval_interval=4)
    torch.set_num_threads(1)
    try:
        result = finetune(cfg, on_eval=outage)
        client = MlflowClient(tracking_uri=uri)
        steps = sorted(m.step for m in client.get_metric_history(result.run_id, tracking.M_TRAIN_LOSS))
        val = sorted(m.step for m in client.get_metric_history(result.run_id, tracking.M_VAL_LOSS))
        status = client.get_run(result.run_id).info.status
    finally:
        for p in procs:
            stop_server(p)
    assert down_at == [4] and result.iters_done == 16
    assert steps == list(range(1, 17)) and val == [0, 4, 8, 12, 16]
    assert status == "FINISHED"
    assert len((tmp_path / "out" / METRICS_FILE).read_text().splitlines()) == 16 + 5  # the local copy
