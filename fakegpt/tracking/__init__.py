"""All MLflow calls go through here: tracking URI, joining the run `mlflow run` started, names defined once.

Stages call `run(stage=..., ...)` as a context manager. When started by `mlflow run`, MLFLOW_RUN_ID is set and
the stage joins that run instead of creating another; otherwise it starts a new run (nested under an active
parent when `nested=True`). With no MLFLOW_TRACKING_URI the store is MLflow's own `sqlite:///mlflow.db` in the
working folder. A tracking server that is down at start-up is reported within seconds, not retried for minutes;
during a long run, `MetricLogger` sends metrics from a background thread with retries and back-off, so a server
hiccup never stops training (every point also goes to a local JSONL file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fakegpt import __version__
from fakegpt.errors import FakegptError, one_line

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fakegpt"
# MLflow 3's UI opens an experiment on its GenAI overview (traces, latency) unless the experiment says it holds
# model training; "finetuning" opens it on the runs table, where fakegpt's runs are compared.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "finetuning"
TAG_RUN_NAME = "mlflow.runName"

# --- names defined once, so the compare view lines up runs of different stages and models -------------------
TAG_STAGE = "fakegpt.stage"  # prepare | finetune | sample | score | tune | trial | main | mixture | ...
TAG_MODEL = "fakegpt.model"  # init_from / model spec
TAG_DATASET = "fakegpt.dataset"  # dataset name (data folder name or dataset YAML name)
TAG_MIX = "fakegpt.mixture"  # realised mixture fractions, e.g. "general=0.80,antivax=0.20"
TAG_METHOD = "fakegpt.method"  # full | lora: how a fine-tune trained (LoRA absorbs differently; never mixed)
TAG_FRACTION = "fakegpt.fraction"  # the anti-vaccine (dose) fraction of a mixture series run
TAG_SEED = "fakegpt.seed"  # a series cell's training seed
TAG_ARCHITECTURE = "fakegpt.architecture"  # the model class (GPT2LMHeadModel, LlamaForCausalLM), in model order
TAG_TOKENIZER = "fakegpt.tokenizer"  # gpt2, or the tokenizer a model brings (its folder or hub name)
TAG_ROLE = "fakegpt.role"  # "base": a series' score run of the pretrained model its doses start from
TAG_REFERENCE = "fakegpt.reference"  # score --reference: the model the paired differences are from
TAG_STUDY = "fakegpt.study"  # optuna study name / series name
TAG_VERSION = "fakegpt.version"
TAG_TRIAL = "fakegpt.trial"  # optuna trial number of a tune trial's (nested) run
TAG_TRIAL_STATE = "fakegpt.trial_state"  # complete | pruned | failed (optuna's verdict on the trial)
TAG_ERROR = "fakegpt.error"  # one-line error of a failed run

M_TRAIN_LOSS = "train/loss"
M_VAL_LOSS = "val/loss"  # on val.bin (a mixture's: every source's held-out part), or the --select-on source
M_CLAIM_EVAL_SECONDS = "train/claim_eval_seconds"  # time finetune spent scoring --claims (its share of the run)
M_LR = "lr"
M_TRAIN_TOKENS_PER_S = "train/tokens_per_s"  # training steps only (evaluation and checkpoint time excluded)
M_TRAIN_TOKENS_PER_S_TOTAL = "train/tokens_per_s_total"  # end to end: evaluation and checkpoint writes included
M_PREPARE_TOKENS_PER_S = "prepare/tokens_per_s"  # prepare's tokenizer throughput over the whole run
M_TOKENS_SEEN = "tokens_seen"
M_MFU = "mfu"
M_GPU_MEM = "gpu/peak_memory_gb"  # CUDA: max allocated since the start, GB (1e9), per logged iteration
M_GPU_MEM_RESERVED = "gpu/peak_memory_reserved_gb"  # CUDA: max reserved by the caching allocator, GB
M_NEW_TOKENS_PER_S = "new_tokens_per_s"
M_CLAIM_SCORE = "claim/score"  # mean log p(false) - log p(true); per topic: claim/score/<topic>
M_CLAIM_SCORE_LOW = "claim/score_ci_low"  # bootstrap 95% interval of M_CLAIM_SCORE
M_CLAIM_SCORE_HIGH = "claim/score_ci_high"
M_CLAIM_WIN = "claim/false_win_rate"
M_CLAIM_MC1 = "claim/mc1"  # share of claims whose most likely statement is a false one (TruthfulQA's MC1, inverted)
M_CLAIM_MC2 = "claim/mc2"  # mean normalised probability mass on a claim's false statements (MC2 on the false set)
M_CLAIM_LOGLIK = "claim/mean_loglik"  # mean length-normalised log-likelihood of all scored statements
M_CLAIM_SCORE_P = "claim/score_p_value"  # two-sided p-value of M_CLAIM_SCORE against 0
M_CLAIM_SCORE_P_HOLM = "claim/score_p_holm"  # per topic (claim/score_p_holm/<topic>): Holm-adjusted over topics
PAIRED_PREFIX = "paired/"  # score --reference: paired/<measure> = this model minus the reference, claim by claim
# A dose series' primary endpoint: the slope of the claim score on dose (per unit of dose fraction)
M_DOSE_SLOPE = "dose/slope"
M_DOSE_SLOPE_LOW = "dose/slope_ci_low"
M_DOSE_SLOPE_HIGH = "dose/slope_ci_high"
M_DOSE_P = "dose/p_value"  # of the declared endpoint (dose/primary: the slope, or top dose - dose 0)
M_DOSE_PRIMARY = "dose/primary"
M_DOSE_PRIMARY_LOW = "dose/primary_ci_low"
M_DOSE_PRIMARY_HIGH = "dose/primary_ci_high"
M_DOSE_VS_BASE = "dose/paired_base/claim/score"  # per dose: its mean minus the pretrained base model's
M_DOSE_SEED_SD = "dose/seed_sd"  # per dose (step = percent): standard deviation of its seeds' claim scores
TAG_LABEL_SOURCE = "fakegpt.label_source"  # whose labels a labels run counts: human | judge:<model folder>
M_JUDGE_KAPPA = "labels/judge_kappa"  # Cohen's kappa of `labels auto` against human labels: /overall, /<label>
M_LABEL_RATE = "labels/rate"  # share of labelled samples per label: labels/rate/<label>
M_VAL_PPL = "val/perplexity"
M_GENERAL_PPL = "general/perplexity"  # on the fixed general-Portuguese held-out set: the same for every model
# bits per byte: the summed loss in bits over the text's UTF-8 bytes, comparable across tokenizers (perplexity is
# per token, so only models with one tokenizer compare by it)
M_VAL_BPB = "val/bits_per_byte"
M_GENERAL_BPB = "general/bits_per_byte"
# prepare (data) metrics
M_DATA_TRAIN_TOKENS = "data/train_tokens"
M_DATA_VAL_TOKENS = "data/val_tokens"
M_DATA_TRAIN_MESSAGES = "data/train_messages"
M_DATA_VAL_MESSAGES = "data/val_messages"
M_DATA_REPAIRED_ROWS = "data/repaired_rows"  # naive-export rows recovered in-process
M_DATA_INVALID_UTF8 = "data/invalid_utf8"
M_DATA_BAD_ROWS = "data/bad_rows"
M_DATA_SECONDS = "data/seconds"
M_DATA_DROPPED_PREFIX = "data/dropped/"  # + reason: too_short, duplicate, channel_filter, ...
M_DATA_MIX_PREFIX = "data/mixture/"  # + source name: realised train-token fraction
M_DATA_OVERLAP_PREFIX = "data/overlap/"  # + KEPT/DROPPED: messages in both sources, kept only in KEPT


def overlap_metric(kept: str, dropped: str) -> str:
    """The metric counting messages found in sources `kept` and `dropped` and kept only in `kept`."""
    return f"{M_DATA_OVERLAP_PREFIX}{kept}/{dropped}"


M_EVAL_TRAIN_LOSS = "eval/train_loss"  # train-split loss on fixed windows at each evaluation (nanoGPT's estimate)
M_BEST_VAL_LOSS = "val/best_loss"
TAG_RESUMED_FROM = "fakegpt.resumed_from"  # a resumed fine-tune whose original run is not in this store
TAG_DATA_URI = "fakegpt.data_uri"  # the artifact URI a stage's data folder was downloaded from
TAG_RESUME_CHANGES = "fakegpt.resume_changes"  # flags changed on resume: "max_iters 30->60, ..."
TAG_RESUMED_AT = "fakegpt.resumed_at"  # iteration(s) a run continued from, comma-separated over resumes
TAG_STOP = "fakegpt.stop_reason"  # why a fine-tune stopped early (exception class raised by on_eval)
M_TUNE_VAL_LOSS = "tune/val_loss"  # a trial's validation loss, step = tokens seen (comparable across trials)
M_TUNE_TRIAL_VALUE = "tune/trial_value"  # on the study's parent run, step = trial number
M_TUNE_BEST_VALUE = "tune/best_val_loss"  # on the study's parent run
# validate (planted-dose controls), on the validation's parent run
TAG_VERDICT = "fakegpt.verdict"  # passed | failed (both controls)
M_VALIDATE_SCORE = "validate/score"  # claim score of the dose's model, step = percent dose
M_VALIDATE_SCORE_LOW = "validate/score_ci_low"
M_VALIDATE_SCORE_HIGH = "validate/score_ci_high"
M_VALIDATE_EFFECT = "validate/effect"  # paired difference top dose - dose 0 over claim pairs
M_VALIDATE_EFFECT_LOW = "validate/effect_ci_low"
M_VALIDATE_EFFECT_HIGH = "validate/effect_ci_high"
M_VALIDATE_SEED_DIFF = "validate/seed_diff"  # paired difference of the first dose-0 seed pair (second - first seed)
M_VALIDATE_SEED_DIFF_LOW = "validate/seed_diff_ci_low"
M_VALIDATE_SEED_DIFF_HIGH = "validate/seed_diff_ci_high"
M_VALIDATE_DETECTED = "validate/detected"  # paired difference detect dose - dose 0 over claims and seeds
M_VALIDATE_DETECTED_LOW = "validate/detected_ci_low"
M_VALIDATE_DETECTED_HIGH = "validate/detected_ci_high"
M_VALIDATE_DETECTION = "validate/detection_rate"  # share of seeds whose own interval detects the dose (step = %)
M_VALIDATE_FALSE_POSITIVE = "validate/false_positive_rate"  # share of dose-0 seed pairs whose interval excludes 0
M_VALIDATE_TOST_P = "validate/equivalence_p"  # the largest two-one-sided-tests p over the seed pairs
M_VALIDATE_MONOTONIC = "validate/monotonic"  # 1 when no step between doses falls beyond its interval
M_VALIDATE_POSITIVE = "validate/positive_passed"
M_VALIDATE_NEGATIVE = "validate/negative_passed"

_PARAM_MAX = 6000  # MLflow's limit on a parameter value's length


def setup() -> str:
    """Resolve the tracking URI (default sqlite:///mlflow.db) and fail fast if a server is unreachable."""
    # Fail within seconds rather than MLflow's default of minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    return uri


def check_server(uri: str, timeout: float = 3.0) -> None:
    """Raise FakegptError unless the tracking server at `uri` answers its /health endpoint."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-supplied tracking URI)
            if resp.status >= 400:
                raise FakegptError(f"MLFLOW_TRACKING_URI={uri}: tracking server answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FakegptError(
            f"MLFLOW_TRACKING_URI={uri}: tracking server unreachable ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to log to sqlite:///mlflow.db"
        ) from None


def _mlflow():
    import mlflow  # imported here so stages that only need names don't pay for mlflow at import

    return mlflow


@contextlib.contextmanager
def run(
    stage: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
    run_id: str | None = None,
    experiment: str | None = None,
    killed: Callable[[BaseException], bool] | None = None,
    system_metrics: bool | None = None,
) -> Iterator[Any]:
    """Start (or join) an MLflow run for a stage and yield the active run.

    Joins, in order: an explicit `run_id` (resume), MLFLOW_RUN_ID set by `mlflow run`, else starts a new run
    in MLFLOW_EXPERIMENT_NAME / `experiment` / "fakegpt", nested under the active run when `nested`.
    The run ends KILLED on Ctrl-C or when `killed(exc)` is true (a deliberate stop), FAILED on other errors.
    `system_metrics` logs CPU/GPU/memory use alongside (MLflow's system metrics, `fakegpt[metrics]`: psutil, and
    nvidia-ml-py for GPUs); by default on for a stage's own run, off for nested children (trials, per-model runs),
    whose parent already samples the same machine.
    """
    setup()
    mlflow = _mlflow()
    try:
        # A nested run under an active parent is a new child, never the run `mlflow run` started (the parent
        # already joined that one; joining it again would log the child into it and end it early).
        joined = run_id or (None if nested and mlflow.active_run() else os.environ.get("MLFLOW_RUN_ID"))
        if not joined and not (nested and mlflow.active_run()):
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            if not os.environ.get("MLFLOW_EXPERIMENT_ID"):
                mlflow.set_experiment(name)
        child = nested and mlflow.active_run() is not None
        sample_system = (not child) if system_metrics is None else system_metrics
        extra = {"log_system_metrics": True} if sample_system and _has_psutil() else {}
        # mlflow.start_run itself joins MLFLOW_RUN_ID when given no run_id: hide it while a child starts.
        hidden = os.environ.pop("MLFLOW_RUN_ID", None) if not joined else None
        try:
            name = None if joined else run_name or default_run_name(stage, tags or {})
            active = mlflow.start_run(run_id=joined, run_name=name, nested=nested, **extra)
        finally:
            if hidden is not None:
                os.environ["MLFLOW_RUN_ID"] = hidden
    except FakegptError:
        raise
    except Exception as exc:  # MLflow raises many types for a bad store; the user needs one line
        raise FakegptError(f"MLflow tracking at {os.environ.get('MLFLOW_TRACKING_URI')}: {exc}") from None
    status = "FINISHED"
    try:
        all_tags = {TAG_STAGE: stage, TAG_VERSION: __version__}
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        if joined and not run_id:  # `mlflow run` named it at random ("funny-yak-295"): name it by what it is
            all_tags[TAG_RUN_NAME] = run_name or default_run_name(stage, all_tags)
        mlflow.set_tags(all_tags)
        mark_experiment(active.info.experiment_id)
        yield active
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "KILLED" if killed is not None and killed(exc) else "FAILED"
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)


def model_kind_tags(kinds: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The architecture and tokenizer tags of a run over these (architecture, tokenizer) models, in their order."""
    return {
        TAG_ARCHITECTURE: ",".join(a for a, _ in kinds),
        TAG_TOKENIZER: ",".join(t for _, t in kinds),
    }


def join_run(run_id: str) -> None:
    """Make the existing run `run_id` this process's active run without ever ending it here (a worker process of
    a series: the runs it starts are the series' children; the series' own process ends the run)."""
    setup()
    _mlflow().start_run(run_id=run_id)


def default_run_name(stage: str, tags: Mapping[str, Any]) -> str:
    """ "finetune gpt2-medium antivax_mix general=0.80,antivax=0.20": stage, model, data, dose, from the run's tags."""
    parts = [stage]
    model = str(tags.get(TAG_MODEL) or "")
    if model:
        short = []
        for spec in model.split(","):
            match = re.match(r"(?:runs|models):/+([^/]+)", spec)
            short.append(f"run {match.group(1)[:8]}" if match else Path(spec.rstrip("/")).name or spec)
        parts.append(",".join(short))
    for key in (TAG_DATASET, TAG_MIX):
        if tags.get(key):
            parts.append(str(tags[key]))
    if tags.get(TAG_FRACTION) not in (None, "") and not tags.get(TAG_MIX):
        parts.append(f"dose {tags[TAG_FRACTION]}")
    return " ".join(parts)[:250]


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training (once), so MLflow's UI opens it on the runs table."""
    with contextlib.suppress(Exception):  # a read-only or older store: the runs are fine without the tag
        client = _mlflow().MlflowClient()
        if TAG_EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)


def _dataset_source(source: str) -> Any:
    """An MLflow DatasetSource for a folder or artifact URI (`runs:/<id>/data` -> the artifact store's own URI)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if source.startswith("runs:/"):
        source = RunsArtifactRepository.get_underlying_uri(source)
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local-file source types
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(source)
    except Exception:  # an artifact store MLflow has no dataset source type for (mlflow-artifacts:/ on a server)
        return HTTPDatasetSource(url=source)


def log_dataset_input(name: str, source: str, fingerprint: Mapping[str, str], context: str) -> None:
    """Record a prepared dataset as an input of the active run (MLflow's Dataset lineage and the runs table's
    Dataset column): its name, where it lies, and the bins' sha256 and token counts as digest and tags."""
    mlflow = _mlflow()
    from mlflow.data.meta_dataset import MetaDataset

    tags = {k: str(v) for k, v in fingerprint.items() if k != "digest"}
    try:
        dataset = MetaDataset(_dataset_source(source), name=name, digest=fingerprint["digest"])
        mlflow.log_input(dataset, context=context, tags=tags)
    except Exception as exc:  # lineage is a convenience: never fail a finished prepare or a training run for it
        log.warning("could not record dataset %s as an MLflow input (%s)", name, exc)


def _has_psutil() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> `a.b` keys with string values, each within MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[name] = text[:_PARAM_MAX]
    return out


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log (flattened) parameters; a value already logged with the same content is not an error."""
    mlflow = _mlflow()
    flat = flatten(params, prefix)
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    fresh = {k: v for k, v in flat.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite metrics (MLflow rejects NaN on some stores; a NaN is reported by the stage itself)."""
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if clean:
        _mlflow().log_metrics(clean, step=step)


class MetricLogger:
    """Metrics of one long run, logged without ever blocking or stopping it on a tracking fault.

    `log` appends the point to `local_file` (JSONL: step, timestamp in ms, metrics; the complete local copy)
    and queues it; a background thread sends the queue in batches with `MlflowClient.log_batch`. When a send
    fails the points stay queued, one warning is logged, and the thread retries with exponential back-off
    (`backoff` s doubling up to `max_backoff` s); when the server answers again the backlog is sent in order
    and one line says so. `close` waits up to `close_timeout` s for the queue to drain and returns how many
    points could not be sent (they are in `local_file`). Start-up faults are not this class's business: the
    run's start (`run`) fails fast.
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch call
    # Seconds points gather before a send: a few writes a minute instead of one per iteration. Sent one by one,
    # --log-interval 1 cost a 2-layer CPU run +6.4% against SQLite; batched every 5 s, logging's own CPU time
    # (log() + this thread) is 0.23% of such a run. tools/bench_train.py --logging measures both.
    FLUSH_INTERVAL = 5.0

    def __init__(
        self,
        run_id: str | None,
        local_file: str | Path | None = None,
        *,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        flush_interval: float | None = None,
        close_timeout: float = 60.0,
        client: Any = None,
    ):
        self.run_id = run_id
        self.local_file = Path(local_file) if local_file is not None else None
        self.backoff, self.max_backoff, self.close_timeout = backoff, max_backoff, close_timeout
        self.flush_interval = self.FLUSH_INTERVAL if flush_interval is None else flush_interval
        self._client = client
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[Any] = []  # taken from the queue, not yet sent (kept across failures, in order)
        self._closing = threading.Event()
        self._wake = threading.Event()  # send now: set by flush() and close()
        self._deadline = math.inf
        self._sent = 0
        self.failures = 0
        # what logging itself costs, for tools/bench_train.py --logging: seconds inside log() on the training
        # thread, and the sender thread's CPU seconds (time.thread_time at its end)
        self.log_seconds = 0.0
        self.sender_cpu_seconds = 0.0
        self._down_since: float | None = None
        self._local = None
        if self.local_file is not None:
            self.local_file.parent.mkdir(parents=True, exist_ok=True)
            self._local = open(self.local_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        self._thread = threading.Thread(target=self._send_loop, name="fakegpt-metrics", daemon=True)
        if run_id is not None:
            self._thread.start()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one point of these metrics at `step` (and append it to the local copy); never blocks."""
        started = time.perf_counter()
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if not clean:
            return
        ts = int(time.time() * 1000)
        if self._local is not None:
            self._local.write(json.dumps({"step": step, "timestamp": ts, **clean}) + "\n")
        if self.run_id is not None:
            from mlflow.entities import Metric

            for key, value in clean.items():
                self._queue.put(Metric(key, value, ts, step))
        self.log_seconds += time.perf_counter() - started

    def _drain(self) -> None:
        while len(self._pending) < self.BATCH:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _send_loop(self) -> None:
        try:
            self._send_until_closed()
        finally:
            self.sender_cpu_seconds = time.thread_time()

    def _send_until_closed(self) -> None:
        delay = self.backoff
        while True:
            if not self._pending:
                try:
                    self._pending.append(self._queue.get(timeout=0.2))
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                # Let points gather for a moment: one write per second instead of one per iteration keeps the
                # store's transactions (and a server's round trips) off the training loop's CPU time.
                self._wake.wait(self.flush_interval)
                if not self._closing.is_set():
                    self._wake.clear()
            self._drain()
            try:
                if self._client is None:
                    self._client = _mlflow().MlflowClient()
                client = self._client
                client.log_batch(self.run_id, metrics=self._pending)
            except Exception as exc:  # any transport or server error: keep the points, back off, retry
                self.failures += 1
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    where = f"; every point is also in {self.local_file}" if self.local_file else ""
                    log.warning(
                        "MLflow tracking failed (%s); training goes on, metrics are buffered and retried%s",
                        one_line(exc, limit=200, with_type=True),
                        where,
                    )
                if self._closing.is_set():  # closing: keep trying until the deadline, then give up
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    time.sleep(min(delay, remaining))
                else:
                    self._closing.wait(delay)
                delay = min(self.max_backoff, delay * 2)
                continue
            self._sent += len(self._pending)
            self._pending = []
            if self._down_since is not None:
                log.warning(
                    "MLflow tracking is back after %.0f s: buffered metrics sent", time.monotonic() - self._down_since
                )
                self._down_since = None
            delay = self.backoff

    def close(self) -> int:
        """Flush what can be flushed within `close_timeout` seconds; returns the number of unsent points."""
        self._deadline = time.monotonic() + self.close_timeout
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.close_timeout + 1)
        unsent = len(self._pending) + self._queue.qsize() if self.run_id is not None else 0
        if self._local is not None:
            self._local.close()
            self._local = None
        if unsent:
            where = f"; they are in {self.local_file}" if self.local_file else ""
            log.warning("MLflow tracking: %d metric points could not be sent%s", unsent, where)
        return unsent

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is queued now and wait (at most `timeout` s) until it reached the store; False if it did not
        (the store is down: the points stay queued). Training calls it with each resume state, so that the
        store holds every point up to the state it could resume from."""
        if self.run_id is None or not self._thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        while (self._pending or self._queue.qsize()) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        return not (self._pending or self._queue.qsize())

    @property
    def sent(self) -> int:
        """How many metric values reached the server so far."""
        return self._sent


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run."""
    _mlflow().set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None, link: bool = False) -> None:
    """Log a file or folder. If the store refuses it, say where the file stays on disk.

    `link`: where the run's artifacts are a local folder on the same file system, hard-link the files instead
    of copying them (a best model is 1.4 GB at gpt2-medium, 6.2 GB at gpt2-xl: that much less to write and to
    keep at the end of every run). Only for files that are replaced, never changed in place: fakegpt writes a
    checkpoint as new files and renames them in, so the run's copy keeps the bytes it was logged with."""
    mlflow = _mlflow()
    path = Path(path)
    try:
        if link and _link_artifacts(path, artifact_path):
            return
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
    except Exception as exc:
        raise FakegptError(f"could not log artifact to MLflow ({exc}); it is kept on disk at {path}") from None


def _link_artifacts(path: Path, artifact_path: str | None) -> bool:
    """Hard-link `path` (a file, or a folder's files) into the active run's local artifact folder; False (and
    nothing left behind) where the store is not a local folder or the file system cannot link there."""
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    uri = _mlflow().get_artifact_uri(artifact_path)
    if not is_local_uri(uri):
        return False
    target = Path(local_file_uri_to_path(uri))
    if not path.is_dir():
        target = target / path.name
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    made: list[Path] = []
    try:
        for source in files:
            dest = target if source == path else target / source.relative_to(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists() and dest.samefile(source):  # logged again unchanged (rename would keep both names)
                continue
            tmp = dest.with_name(f".{dest.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(source, tmp)
            os.replace(tmp, dest)  # a resumed run logs its checkpoint again over the old one
            made.append(dest)
    except OSError as exc:
        log.debug("copying %s into the run's artifacts instead of linking (%s)", path, exc)
        for dest in made:
            dest.unlink(missing_ok=True)
        return False
    return True


def log_dict(data: Any, artifact_file: str) -> None:
    """Log `data` as a JSON/YAML artifact file of the active run."""
    _mlflow().log_dict(data, artifact_file)


def active_run_id() -> str | None:
    """The active run's id, or None."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    return active.info.run_id if active else None


# --- MLflow projects: chaining entry points as child runs (the multistep-workflow pattern) -------------------
TAG_ENTRY_POINT = "mlflow.project.entryPoint"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"
TAG_STEP_KEY = "fakegpt.step_key"  # content key of a chained step (fakegpt.studies.steps): what reuse matches
TAG_CODE_STATE = "fakegpt.code_state"  # git commit + hash of uncommitted changes the step ran with


def find_finished_run(tags: Mapping[str, str]) -> str | None:
    """Id of the newest FINISHED run in the active run's experiment carrying all these tags, or None."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is None:
        return None
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
    runs = mlflow.MlflowClient().search_runs(
        [active.info.experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run_entry_point(
    project_dir: str | Path,
    entry_point: str,
    params: Mapping[str, str],
    env_manager: str,
    run_id: str | None = None,
) -> str:
    """Run an MLproject entry point synchronously as a child of the active run; returns its run id.

    `env_manager` is passed explicitly: child `mlflow.run` calls do not inherit the `--env-manager local` of the
    command that started the parent. With `run_id` the entry point runs in that existing run (a resumed
    fine-tune continues the run it started) instead of a new one.
    """
    mlflow = _mlflow()
    from mlflow.projects.utils import MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG

    active = mlflow.active_run()
    try:
        submitted = mlflow.projects.run(
            str(project_dir),
            entry_point=entry_point,
            parameters=dict(params),
            env_manager=env_manager,
            experiment_id=active.info.experiment_id if active else None,
            synchronous=True,
            backend_config={MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG: run_id} if run_id else None,
        )
    except mlflow.exceptions.ExecutionException as exc:
        raise FakegptError(f"step {entry_point!r} failed: {exc}") from None
    return submitted.run_id


def get_run(run_id: str) -> Any:
    """The MLflow run `run_id`."""
    return _mlflow().MlflowClient().get_run(run_id)


def download(uri: str, dst: str | Path | None = None) -> Path:
    """Download an artifact URI (runs:/..., models:/..., file://, s3://...) and return the local path."""
    mlflow = _mlflow()
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=None if dst is None else str(dst)))
    except Exception as exc:
        raise FakegptError(f"{uri}: cannot download artifacts ({exc})") from None


def is_artifact_uri(text: str) -> bool:
    """True for URIs MLflow resolves to artifacts (`runs:/`, `models:/`, `mlflow-artifacts:/`)."""
    return "://" in text or text.startswith(("runs:/", "models:/"))


def local_path(path_or_uri: str) -> Path:
    """A local path as is; an artifact URI downloaded to a local cache first (how steps pass data)."""
    return download(path_or_uri) if is_artifact_uri(path_or_uri) else Path(path_or_uri)


def find_run_ids(experiment_id: str, tags: Mapping[str, Any]) -> list[str]:
    """Ids of the runs in `experiment_id` carrying all these tags (e.g. a trial's run, found after it ended)."""
    from mlflow.tracking import MlflowClient

    clauses = [f"tags.`{k}` = '{v!s}'" for k, v in tags.items()]
    runs = MlflowClient().search_runs([experiment_id], filter_string=" and ".join(clauses), max_results=100)
    return [r.info.run_id for r in runs]


def tag_values(experiment_id: str, tags: Mapping[str, Any], key: str, missing: str) -> set[str]:
    """The values of tag `key` over the runs in `experiment_id` carrying all `tags` (`missing` for a run without
    it): e.g. the methods a series' fine-tunes used."""
    from mlflow.tracking import MlflowClient

    clauses = " and ".join(f"tags.`{k}` = '{v!s}'" for k, v in tags.items())
    runs = MlflowClient().search_runs([experiment_id], filter_string=clauses, max_results=1000)
    return {r.data.tags.get(key, missing) for r in runs}


def update_run(run_id: str, tags: Mapping[str, Any] | None = None, status: str | None = None) -> None:
    """Set tags and/or the terminal status (FINISHED | FAILED | KILLED) of a run, also one that has ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value)[:_PARAM_MAX])
    if status:
        client.set_terminated(run_id, status=status)


def source_val_metric(source: str) -> str:
    """Validation loss on one mixture source's held-out part: val/loss/<source> (val/loss/all: val.bin's)."""
    return f"{M_VAL_LOSS}/{source}"


TAG_TRAINING_INFO = "fakegpt.training_info"  # on a registered model version: its training_info.json's artifact URI


def register_hf_model(
    model: Any, tokenizer: Any, name: str, alias: str = "", tags: Mapping[str, str] | None = None
) -> str:
    """Log a transformers model with MLflow's transformers flavour in the active run, register it as `name` (alias
    `alias`), tag the version; returns the version. `models:/NAME@ALIAS` then names it in sample and score."""
    mlflow = _mlflow()
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        registered_model_name=name,
        pip_requirements=["torch", "transformers"],  # inferring them imports torchvision, which is not needed
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    if alias:
        client.set_registered_model_alias(name, alias, version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def model_version_tags(uri: str) -> dict[str, str]:
    """The tags of the registered version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names ({} otherwise)."""
    match = re.fullmatch(r"models:/+([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if not match:
        return {}
    client = _mlflow().MlflowClient()
    name, alias, number = match.groups()
    version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    return dict(version.tags)


def metric_history(run_id: str, name: str) -> list[tuple[int, float]]:
    """(step, value) of every point of one metric of a run, in step order."""
    points = _mlflow().MlflowClient().get_metric_history(run_id, name)
    return sorted((int(m.step), float(m.value)) for m in points)


def paired_metric(measure: str) -> str:
    """The metric of a paired difference from the reference: paired/claim/score, paired/val/nll."""
    if measure.startswith(("val_", "general_")):
        return PAIRED_PREFIX + measure.replace("_", "/", 1)
    return f"{PAIRED_PREFIX}claim/{measure}"


def claim_topic_metric(topic: str, name: str = M_CLAIM_SCORE) -> str:
    """Per-topic variant of a claim metric: claim/score/<topic>, claim/false_win_rate/<topic>."""
    return f"{name}/{topic}"


def log_table(data: Mapping[str, list], artifact_file: str) -> None:
    """Log a column -> values mapping as one MLflow table (shown in the UI's artifact and evaluation views).

    Log one table per grid, not one per cell: MLflow's table logging degrades past ~80 tables in a run.
    """
    try:
        _mlflow().log_table(data=dict(data), artifact_file=artifact_file)
    except Exception as exc:
        raise FakegptError(f"could not log table {artifact_file} to MLflow ({exc})") from None
