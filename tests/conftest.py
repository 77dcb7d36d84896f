"""Shared fixtures: offline environment, real data from ../shared/data, tiny GPT-2 models made from scratch."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from tiny_runs import make_tiny_model, make_tokenizer

# Never touch the network: transformers would retry each missing hub file for ~23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_RUN_ID", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FAKEGPT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Portuguese corpora (Telegram schema) that every developer and CI run has beside the project."""
    if not (SHARED_DATA / "fakewhatsapp_br.csv").is_file():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set FAKEGPT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite store. Creating one runs MLflow's schema migrations (~5-10 s);
    copying this file gives each test a fresh store in milliseconds."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with contextlib.chdir(path.parent):  # the Default experiment's artifacts: ./mlruns here, not the repository
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch, _mlflow_template_db):
    """Each test logs to its own SQLite MLflow store and never joins an outer run."""
    import shutil

    shutil.copyfile(_mlflow_template_db, tmp_path / "mlflow.db")
    # MLflow puts a new experiment's artifacts in ./mlruns: this test's folder, not the working tree (where
    # every run of the suite used to leave its checkpoints behind)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    yield
    try:
        import mlflow

        while mlflow.active_run():
            mlflow.end_run()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def big_tokenizer(tmp_path_factory, shared_data) -> Path:
    """A Hugging Face tokenizer folder of 70,000 ids (more than uint16 holds; EOS "<|end|>"): a byte-level BPE
    trained on the real WhatsApp corpus, so its messages use ids beyond 65,535. About 2 s, built once."""
    return make_tokenizer(tmp_path_factory.mktemp("big-tokenizer"), shared_data / "fakewhatsapp_br.csv", 70_000)


@pytest.fixture(scope="session")
def big_vocab_llama(tmp_path_factory, big_tokenizer) -> Path:
    """A tiny random Llama that brings its own tokenizer: big_tokenizer's 70,000 ids (uint32 bins), EOS
    "<|end|>", no BOS, as an HF model folder."""
    from tiny_runs import make_tiny_decoder, with_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(big_tokenizer))
    folder = tmp_path_factory.mktemp("llama-big-vocab")
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    make_tiny_decoder(folder, "llama", tie=False, **ids)
    return with_tokenizer(folder, big_tokenizer)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, shared_data) -> Path:
    """A Hugging Face tokenizer folder of 8,000 ids (not GPT-2's; uint16 bins), trained like big_tokenizer."""
    return make_tokenizer(tmp_path_factory.mktemp("small-tokenizer"), shared_data / "fakewhatsapp_br.csv", 8_000)


@pytest.fixture(scope="session")
def prepared_whatsapp(tmp_path_factory, shared_data) -> Path:
    """fakewhatsapp_br.csv prepared with default settings: a folder with train.bin, val.bin, meta.json."""
    from fakegpt.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared-whatsapp")
    prepare(PrepareConfig(inputs=[str(shared_data / "fakewhatsapp_br.csv")], out=str(out), force=True), track=False)
    return out


@pytest.fixture
def postgres_url() -> str:
    """The loopback PostgreSQL of tools/postgres.sh (.ci/run starts it); the test is skipped without one, or
    fails when FAKEGPT_REQUIRE_POSTGRES=1 says there must be one."""
    url = os.environ.get("FAKEGPT_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("FAKEGPT_REQUIRE_POSTGRES") == "1":
            pytest.fail("FAKEGPT_REQUIRE_POSTGRES=1 but FAKEGPT_TEST_POSTGRES_URL is not set (tools/postgres.sh)")
        pytest.skip("no PostgreSQL: export FAKEGPT_TEST_POSTGRES_URL=$(bash tools/postgres.sh)")
    return url
