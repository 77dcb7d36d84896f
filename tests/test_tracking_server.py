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


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
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
        stderr=open(folder / "server.log", "w"),
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
